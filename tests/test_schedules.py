"""Schedules: closed forms, diffusers parity of betas and timesteps, exact conversions."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.diffusion import schedules


def test_linear_closed_form_and_fields():
  s = schedules.make_schedule("linear", 1000, 1e-4, 0.02)
  assert s.T == 1000 and s.num_timesteps == 1000
  betas = np.linspace(1e-4, 0.02, 1000)
  ab = np.cumprod(1 - betas)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-5)
  np.testing.assert_allclose(s.sigmas, np.sqrt((1 - ab) / ab), rtol=1e-5)
  np.testing.assert_allclose(
    s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, 1.0, atol=1e-6
  )
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  np.testing.assert_allclose(s.posterior_variance, betas * (1 - ab_prev) / (1 - ab), rtol=1e-5)
  assert float(s.posterior_log_variance_clipped[0]) == pytest.approx(
    float(s.posterior_log_variance_clipped[1])
  )


def test_cosine_closed_form():
  s = schedules.make_schedule("cosine", 1000)
  f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
  for t in (0, 10, 500, 900):
    assert float(s.alphas_cumprod[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-4)
  assert float(s.betas.max()) <= 0.999 + 1e-7


@pytest.mark.parametrize(
  "kind,ref,kw",
  [
    ("linear", "linear", {}),
    ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    ("cosine", "squaredcos_cap_v2", {}),
    ("sigmoid", "sigmoid", {}),
  ],
)
def test_betas_match_diffusers(kind, ref, kw):
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  d = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=ref, **kw)
  ours = schedules.make_schedule(kind, 1000, **kw)
  np.testing.assert_allclose(ours.betas, d.betas.numpy(), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(ours.alphas_cumprod, d.alphas_cumprod.numpy(), rtol=1e-4, atol=1e-7)


def test_zero_terminal_snr():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True)
  plain = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  assert float(s.alphas_cumprod[-1]) == 0.0
  assert float(s.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-6)
  from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

  ref = rescale_zero_terminal_snr(torch.from_numpy(np.asarray(plain.betas, np.float64)))
  np.testing.assert_allclose(s.betas, ref.numpy(), rtol=1e-5)
  del diffusers


# Each diffusers scheduler's own timestep formula and the keywords that select it here.
TIMESTEP_RULES = {
  "DDPMScheduler": {},
  "DDIMScheduler": {},
  "EulerDiscreteScheduler": {"fractional": True},
  "EulerAncestralDiscreteScheduler": {"fractional": True},
  "HeunDiscreteScheduler": {"fractional": True},
  "DPMSolverMultistepScheduler": {"multistep": True},
  "UniPCMultistepScheduler": {"multistep": True},
}


@pytest.mark.parametrize("cls_name", list(TIMESTEP_RULES))
def test_spacings_match_each_diffusers_scheduler(cls_name):
  """Every spacing, steps_offset 0 and 1, steps from 1 to T: the same values and dtype
  (diffusers' timesteps, before Heun repeats them), or a ValueError where diffusers' own
  grid is broken (t = T, repeated or -1 timesteps)."""
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  rule = TIMESTEP_RULES[cls_name]
  dtype = np.float32 if rule.get("fractional") else np.int64
  compared = 0
  for spacing in ("leading", "trailing", "linspace"):
    for offset in (0, 1):
      d = getattr(diffusers, cls_name)(timestep_spacing=spacing, steps_offset=offset)
      for steps in (1, 2, 3, 7, 10, 50, 333, 998, 999, 1000):
        d.set_timesteps(steps)
        ref = d.timesteps.numpy()
        ref = np.concatenate([ref[:1], ref[1::2]]) if cls_name == "HeunDiscreteScheduler" else ref
        if len(ref) == steps + 1:
          # diffusers' float arange overshoots to n + 1 trailing points, the last -1.
          assert spacing == "trailing" and ref[-1] == -1
          ref = ref[:steps]
        if ref.max() >= 1000 or len(np.unique(ref)) != steps:
          with pytest.raises(ValueError, match="outside|repeats"):
            schedules.spaced_timesteps(1000, steps, spacing, offset, **rule)
          continue
        ours = schedules.spaced_timesteps(1000, steps, spacing, offset, **rule)
        assert ours.dtype == dtype
        np.testing.assert_array_equal(ours, ref, err_msg=f"{spacing} {offset} {steps}")
        compared += 1
  assert compared >= 50


def test_multistep_and_fractional_rules_closed_form():
  """DPM-Solver/UniPC space n + 1 points (leading: T // (n + 1) apart) and drop the lowest;
  Euler keeps linspace's fractions."""
  np.testing.assert_array_equal(
    schedules.spaced_timesteps(1000, 4, "linspace", multistep=True), [999, 749, 500, 250]
  )
  np.testing.assert_array_equal(
    schedules.spaced_timesteps(1000, 4, "leading", 1, multistep=True), [801, 601, 401, 201]
  )
  np.testing.assert_array_equal(schedules.spaced_timesteps(1000, 4, "linspace"), [999, 666, 333, 0])
  np.testing.assert_array_equal(
    schedules.spaced_timesteps(1000, 4, "linspace", fractional=True), [999, 666, 333, 0]
  )
  np.testing.assert_allclose(
    schedules.spaced_timesteps(1000, 3, "linspace", fractional=True), [999, 499.5, 0]
  )
  # steps_offset applies to leading only.
  for spacing in ("trailing", "linspace"):
    np.testing.assert_array_equal(
      schedules.spaced_timesteps(1000, 5, spacing, 3), schedules.spaced_timesteps(1000, 5, spacing)
    )


def test_schedule_from_alphas_cumprod_keeps_the_table():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  for kw in ({}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}):
    d = diffusers.DDIMScheduler(**kw)
    ab = d.alphas_cumprod.numpy()  # float32 torch.cumprod
    s = schedules.schedule_from_alphas_cumprod(ab)
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), ab)
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod_prev)[1:], ab[:-1])
    # betas from ratios of float32 neighbours: measured 3.5e-4 relative.
    np.testing.assert_allclose(s.betas, d.betas.numpy(), rtol=1e-3)
    np.testing.assert_allclose(s.sigmas, np.sqrt((1 - ab) / ab), rtol=1e-6)
  zero = diffusers.DDIMScheduler(rescale_betas_zero_snr=True).alphas_cumprod.numpy()
  assert zero[-1] == 0.0
  s = schedules.schedule_from_alphas_cumprod(zero)  # a last entry of 0 is allowed
  assert float(s.betas[-1]) == 1.0 and float(s.sigmas[-1]) == np.inf
  ref = schedules.make_schedule()
  np.testing.assert_allclose(
    schedules.schedule_from_alphas_cumprod(np.asarray(ref.alphas_cumprod)).posterior_variance,
    ref.posterior_variance,
    rtol=2e-3,
  )
  del torch


@pytest.mark.parametrize(
  "table,message",
  [
    ([0.9, 0.95], "strictly decreasing"),
    ([1.0, 0.5], "alphas_cumprod[0] must be < 1"),
    ([1.5, 0.5], "strictly decreasing in (0, 1]"),
    ([0.9, 0.0, 0.0], "strictly decreasing"),
    ([[0.9, 0.5]], "non-empty 1-D"),
  ],
)
def test_schedule_from_alphas_cumprod_bad_input(table, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    schedules.schedule_from_alphas_cumprod(table)


def test_karras_sigmas():
  k = np.asarray(schedules.karras_sigmas(0.03, 14.6, 5))
  assert k[0] == pytest.approx(14.6, rel=1e-5) and k[-1] == pytest.approx(0.03, rel=1e-5)
  r = k ** (1 / 7)
  np.testing.assert_allclose(np.diff(r), np.diff(r)[0], rtol=1e-4)  # uniform in sigma^(1/rho)


def test_sigma_to_t_inverts():
  s = schedules.make_schedule()
  t = schedules.sigma_to_t(s, s.sigmas[jnp.array([0, 17, 500, 999])])
  np.testing.assert_allclose(t, [0, 17, 500, 999], atol=1e-2)


def test_q_sample_and_conversions_are_exact():
  s = schedules.make_schedule()
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (4, 3, 3, 2))
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 10, 500, 999])
  x_t = schedules.q_sample(s, x0, t, eps)
  a, sg = s.sqrt_alphas_cumprod[t], s.sqrt_one_minus_alphas_cumprod[t]
  np.testing.assert_allclose(
    x_t, a[:, None, None, None] * x0 + sg[:, None, None, None] * eps, rtol=1e-6
  )
  v = schedules.target(x0, eps, a, sg, "v")
  for pred in ("eps", "v", "x0"):
    out = schedules.target(x0, eps, a, sg, pred)
    rx0, reps = schedules.to_x0_eps(out, x_t, a, sg, pred)
    tol = dict(atol=2e-3) if pred == "eps" else dict(atol=2e-5)  # /alpha at t=999 amplifies
    np.testing.assert_allclose(rx0, x0, **tol)
    if pred != "x0":
      np.testing.assert_allclose(reps, eps, atol=2e-5)
    np.testing.assert_allclose(
      schedules.convert(out, x_t, a, sg, source=pred, dest="v")[1:3], v[1:3], atol=1e-4
    )


def test_bad_input():
  with pytest.raises(ValueError, match="Unknown beta schedule 'cosinus'"):
    schedules.make_schedule("cosinus")
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.make_schedule(num_timesteps=0)
  with pytest.raises(ValueError, match="spacing"):
    schedules.spaced_timesteps(1000, 10, "uniform")
  with pytest.raises(ValueError, match=r"steps must be in \[1, T=1000\]"):
    schedules.spaced_timesteps(1000, 1001)
  # One past the last valid grid: leading 10 steps + offset 100 reaches T = 1000.
  schedules.spaced_timesteps(1000, 10, "leading", 99)
  with pytest.raises(ValueError, match=r"leading timesteps for steps=10 reach 1000, outside"):
    schedules.spaced_timesteps(1000, 10, "leading", 100)
  # The multistep rule repeats timesteps at steps = T (diffusers would step by h = 0).
  schedules.spaced_timesteps(1000, 999, "leading", multistep=True)
  with pytest.raises(ValueError, match="'linspace' repeats timesteps at steps=1000"):
    schedules.spaced_timesteps(1000, 1000, "linspace", multistep=True)
  with pytest.raises(ValueError, match="prediction type"):
    schedules.target(jnp.zeros(1), jnp.zeros(1), 1.0, 0.0, "score")
