"""Samplers: parity with diffusers' schedulers step by step, analytic convergence, errors."""

import functools
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.diffusion import samplers, schedules

SHAPE = (2, 4, 4, 3)  # NHWC; diffusers sees (2, 3, 4, 4)
COEF = np.array([0.7, -0.4, 1.1], np.float32)  # per-channel, so layouts must line up


def _dummy_np(xp, x, t, channel_axis):
  """A deterministic nonlinear 'model' written for both jnp and torch."""
  shape = [1] * x.ndim
  shape[channel_axis] = -1
  c = xp.asarray(COEF).reshape(shape) if xp is jnp else xp.from_numpy(COEF).reshape(shape)
  return xp.tanh(c * x + 0.5 * xp.sin(t / 137.0)) + 0.05 * x


def jax_model(learn_sigma=False):
  def denoise(x, t):
    tt = t.reshape((-1,) + (1,) * (x.ndim - 1))
    out = _dummy_np(jnp, x, tt, -1)
    if learn_sigma:
      out = jnp.concatenate([out, jnp.tanh(0.3 * x + tt / 1000.0)], axis=-1)
    return out

  return denoise


def torch_model(torch, learn_sigma=False):
  def model(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    out = _dummy_np(torch, x, t, 1)
    if learn_sigma:
      out = torch.cat([out, torch.tanh(0.3 * x + t / 1000.0)], dim=1)
    return out

  return model


def run_diffusers(torch, monkeypatch, module, sched, x0, noises, learn_sigma=False, **step_kw):
  """Runs a diffusers scheduler loop, feeding noises[i] to whatever it draws at step i."""
  state = {"i": 0}
  monkeypatch.setattr(
    module, "randn_tensor", lambda *a, **k: noises[state["i"]].clone(), raising=False
  )
  model = torch_model(torch, learn_sigma)
  x, traj = x0, []
  for i, t in enumerate(sched.timesteps):
    state["i"] = i
    out = model(sched.scale_model_input(x, t), t)
    x = sched.step(out, t, x, **step_kw).prev_sample
    traj.append(x.numpy())
  return np.stack(traj)


CASES = {
  # name: (diffusers class, diffusers kwargs, our kwargs)
  "ddpm": ("DDPMScheduler", {"timestep_spacing": "leading"}, {"timestep_spacing": "leading"}),
  "ddpm_large": (
    "DDPMScheduler",
    {"timestep_spacing": "leading", "variance_type": "fixed_large"},
    {"sampler": "ddpm", "timestep_spacing": "leading", "variance": "fixed_large"},
  ),
  "ddpm_learned": (
    "DDPMScheduler",
    {"timestep_spacing": "leading", "variance_type": "learned_range"},
    {"sampler": "ddpm", "timestep_spacing": "leading", "learn_sigma": True},
  ),
  "ddim": ("DDIMScheduler", {"timestep_spacing": "trailing"}, {}),
  "ddim_eta": (
    "DDIMScheduler",
    {"timestep_spacing": "leading"},
    {"sampler": "ddim", "timestep_spacing": "leading", "eta": 1.0},
  ),
  "ddim_v": (
    "DDIMScheduler",
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"sampler": "ddim", "prediction": "v"},
  ),
  "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
  "euler_karras": (
    "EulerDiscreteScheduler",
    {"timestep_spacing": "trailing", "use_karras_sigmas": True},
    {"sampler": "euler", "karras": True},
  ),
  "euler_ancestral": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
  "heun": ("HeunDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
  "heun_karras_v": (
    "HeunDiscreteScheduler",
    {"timestep_spacing": "trailing", "use_karras_sigmas": True, "prediction_type": "v_prediction"},
    {"sampler": "heun", "karras": True, "prediction": "v"},
  ),
  "dpmpp_2m": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, {}),
  "dpmpp_2m_karras": (
    "DPMSolverMultistepScheduler",
    {"timestep_spacing": "trailing", "use_karras_sigmas": True},
    {"sampler": "dpmpp_2m", "karras": True},
  ),
  "dpmpp_2m_v": (
    "DPMSolverMultistepScheduler",
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"sampler": "dpmpp_2m", "prediction": "v"},
  ),
  "dpmpp_2m_sde": (
    "DPMSolverMultistepScheduler",
    {"timestep_spacing": "trailing", "algorithm_type": "sde-dpmsolver++"},
    {},
  ),
  "dpmpp_3m": (
    "DPMSolverMultistepScheduler",
    {"timestep_spacing": "trailing", "solver_order": 3},
    {},
  ),
  "unipc": ("UniPCMultistepScheduler", {"timestep_spacing": "trailing"}, {}),
  "unipc_karras": (
    "UniPCMultistepScheduler",
    {"timestep_spacing": "trailing", "use_karras_sigmas": True},
    {"sampler": "unipc", "karras": True},
  ),
  "lcm": ("LCMScheduler", {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name, monkeypatch):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")

  cls_name, ref_kwargs, our_kwargs = CASES[name]
  our_kwargs = {"sampler": name, **our_kwargs}
  steps = 4 if name == "lcm" else 10
  ref_cls = getattr(diffusers, cls_name)
  extra = {}
  if "clip_sample" in inspect.signature(ref_cls.__init__).parameters:
    extra["clip_sample"] = False
  sched = ref_cls(num_train_timesteps=1000, **extra, **ref_kwargs)
  module = importlib.import_module(ref_cls.__module__)
  # Same betas; both sides then use our float64-accumulated alphas_cumprod (rounded to fp32).
  schedule = schedules.schedule_from_betas(sched.betas.double().numpy())
  sched.alphas_cumprod = torch.from_numpy(np.asarray(schedule.alphas_cumprod))
  sched.set_timesteps(steps)

  learn_sigma = our_kwargs.get("learn_sigma", False)
  plan = samplers.build_plan(
    schedule,
    **{
      k: v
      for k, v in our_kwargs.items()
      if k in ("sampler", "eta", "timestep_spacing", "karras", "variance")
    },
    steps=steps,
  )
  n = plan.num_steps
  assert n == len(sched.timesteps)
  np.testing.assert_allclose(np.asarray(plan.infos["t"]), sched.timesteps.numpy(), atol=1e-4)

  rng = np.random.default_rng(0)
  x_T = rng.standard_normal(SHAPE).astype(np.float32)
  noises = rng.standard_normal((n, *SHAPE)).astype(np.float32)
  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))
  x0_ref = to_torch(x_T * float(plan.noise_scale))
  step_kw = {"eta": our_kwargs["eta"]} if "eta" in our_kwargs else {}
  ref = run_diffusers(
    torch, monkeypatch, module, sched, x0_ref, [to_torch(z) for z in noises], learn_sigma, **step_kw
  )
  ref = np.moveaxis(ref, 2, -1)  # (n, B, H, W, C)

  sample = jax.jit(
    functools.partial(
      samplers.sample, jax_model(learn_sigma), steps=steps, return_trajectory=True, **our_kwargs
    )
  )
  x, traj = sample(jnp.asarray(x_T), jax.random.key(0), schedule, noise=jnp.asarray(noises))
  assert traj.shape == ref.shape
  scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4), keepdims=True))
  np.testing.assert_allclose(np.asarray(traj) / scale, ref / scale, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(x) / scale[-1], ref[-1] / scale[-1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- analytic case

MU, VAR = 0.5, 0.25  # data ~ N(MU, VAR I)


def gaussian_denoiser(schedule):
  return schedules.gaussian_eps_predictor(schedule, MU, VAR)


def _ode_error(schedule, sampler, steps, x_T):
  x = samplers.sample(
    gaussian_denoiser(schedule), x_T, jax.random.key(0), schedule, sampler=sampler, steps=steps
  )
  exact = schedules.gaussian_ode_solution(schedule, x_T, MU, VAR)
  return float(np.sqrt(np.mean((np.asarray(x, np.float64) - exact) ** 2)))


@pytest.mark.parametrize(
  "sampler,order", [("ddim", 1), ("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("unipc", 2)]
)
def test_error_decreases_at_expected_order(sampler, order):
  schedule = schedules.make_schedule()
  x_T = jax.random.normal(jax.random.key(1), (256, 1))
  e1, e2 = _ode_error(schedule, sampler, 25, x_T), _ode_error(schedule, sampler, 50, x_T)
  rate = np.log2(e1 / e2)
  assert e2 < e1
  if order == 1:
    assert 0.7 < rate < 1.5, (e1, e2, rate)
  else:
    assert rate > 1.6, (e1, e2, rate)


@pytest.mark.parametrize(
  "sampler,steps", [("ddim", 50), ("dpmpp_2m", 20), ("ddpm", 1000), ("euler_ancestral", 1000)]
)
def test_sample_moments_match_data(sampler, steps):
  # Ancestral samplers are under-dispersed on coarse grids (their reverse kernel ignores
  # Var[x0 | x_t]), so they get the full T-step grid.
  schedule = schedules.make_schedule()
  x_T = jax.random.normal(jax.random.key(2), (4000, 1))
  x = samplers.sample(
    gaussian_denoiser(schedule), x_T, jax.random.key(3), schedule, sampler=sampler, steps=steps
  )
  assert abs(float(x.mean()) - MU) < 0.04
  assert abs(float(x.var()) - VAR) < 0.03


# ----------------------------------------------------------------------------- structure


def test_model_traced_once_and_arbitrary_shapes():
  schedule = schedules.make_schedule()
  calls = []

  def denoise(x, t):
    calls.append(x.shape)
    return gaussian_denoiser(schedule)(x, t)

  x_T = jax.random.normal(jax.random.key(0), (3, 2, 5))  # any (B, ...) shape
  x = samplers.sample(denoise, x_T, jax.random.key(0), schedule, sampler="heun", steps=8)
  assert x.shape == x_T.shape and len(calls) == 1  # 15 evaluations, one trace (one scan)


def test_python_loop_of_steps_matches_scan():
  schedule = schedules.make_schedule()
  den = gaussian_denoiser(schedule)
  x_T = jax.random.normal(jax.random.key(0), (4, 3))
  plan = samplers.build_plan(schedule, sampler="dpmpp_2m", steps=6)
  predict = samplers.make_predict(den, plan.space, "eps", False, None)
  step = jax.jit(lambda c, info: plan.step(c, info, predict, jnp.zeros_like(x_T)))
  carry = plan.init(plan.noise_scale * x_T)
  for i in range(plan.num_steps):
    carry = step(carry, jax.tree.map(lambda a, i=i: a[i], plan.infos))
  ref = samplers.sample(den, x_T, jax.random.key(0), schedule, sampler="dpmpp_2m", steps=6)
  np.testing.assert_allclose(carry["x"], ref, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors():
  schedule = schedules.make_schedule(num_timesteps=100)
  den = gaussian_denoiser(schedule)
  x = jnp.zeros((2, 4, 4, 1))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="valid samplers are: ddpm, ddim, euler"):
    samplers.sample(den, x, key, schedule, sampler="plms")
  for steps in (0, 101):
    with pytest.raises(ValueError, match=r"steps must be in \[1, T=100\]"):
      samplers.sample(den, x, key, schedule, steps=steps)
  with pytest.raises(ValueError, match="timestep_spacing"):
    samplers.sample(den, x, key, schedule, timestep_spacing="uniform")
  with pytest.raises(ValueError, match="prediction type"):
    samplers.sample(den, x, key, schedule, prediction="score")
  with pytest.raises(ValueError, match="2 output channels"):
    samplers.sample(den, x, key, schedule, steps=2, learn_sigma=True)
  with pytest.raises(ValueError, match="karras"):
    samplers.sample(den, x, key, schedule, sampler="ddim", karras=True)
