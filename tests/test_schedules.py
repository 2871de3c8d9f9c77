"""Schedules: closed forms, diffusers parity of betas and timesteps, exact conversions."""

import math

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


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_spacings_match_diffusers_ddim(spacing, steps):
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  d = diffusers.DDIMScheduler(timestep_spacing=spacing)
  d.set_timesteps(steps)
  np.testing.assert_array_equal(
    schedules.spaced_timesteps(1000, steps, spacing), d.timesteps.numpy()
  )


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
  with pytest.raises(ValueError, match="prediction type"):
    schedules.target(jnp.zeros(1), jnp.zeros(1), 1.0, 0.0, "score")
