"""Samplers: parity with diffusers' schedulers step by step, analytic convergence, errors,
the registry and the settings."""

import ast
import dataclasses
import functools
import importlib
import inspect
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import ROOT

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
  model_kwargs = {k: our_kwargs.pop(k) for k in ("prediction", "learn_sigma") if k in our_kwargs}
  settings = samplers.SamplerSettings(**our_kwargs, steps=4 if name == "lcm" else 10)
  ref_cls = getattr(diffusers, cls_name)
  extra = {}
  if "clip_sample" in inspect.signature(ref_cls.__init__).parameters:
    extra["clip_sample"] = False
  sched = ref_cls(num_train_timesteps=1000, **extra, **ref_kwargs)
  module = importlib.import_module(ref_cls.__module__)
  # Same betas; both sides then use our float64-accumulated alphas_cumprod (rounded to fp32).
  schedule = schedules.schedule_from_betas(sched.betas.double().numpy())
  sched.alphas_cumprod = torch.from_numpy(np.asarray(schedule.alphas_cumprod))
  sched.set_timesteps(settings.steps)

  learn_sigma = model_kwargs.get("learn_sigma", False)
  plan = samplers.build_plan(schedule, settings)
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
      samplers.sample,
      jax_model(learn_sigma),
      settings=settings,
      return_trajectory=True,
      **model_kwargs,
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


# ----------------------------------------------------------------------------- registry, settings

KEY = jax.random.key(0)


def _config(distill: dict | None = None, **sample):
  c = ml_collections.ConfigDict()
  c.sample = {"sampler": "ddim", "steps": 50, "cfg_scale": 4.0, "eta": 0, "num": 16, **sample}
  c.diffusion = dict(num_timesteps=1000, prediction="eps")
  if distill is not None:
    c.distill = {"num_ddim_timesteps": 25, "solver": "ddim", **distill}
  c.lock()
  return c


@pytest.mark.parametrize(
  "settings,message",
  [
    (dict(sampler="plms"), "valid samplers are: " + ", ".join(samplers.SAMPLERS)),
    (dict(steps=0), r"steps must be in [1, T=100], got 0"),
    (dict(steps=2.5), r"steps must be an integer in [1, T=100], got 2.5"),
    (dict(timestep_spacing="uniform"), "'uniform'; expected one of ('leading', 'trailing'"),
    (dict(steps_offset=-1), "steps_offset must be an integer >= 0, got -1"),
    (dict(sampler="lcm", karras=True), "not supported by sampler 'lcm'; samplers with karras "),
    (dict(sampler="ddpm", variance="small"), "variance 'small'; expected one of ('fixed_small'"),
    (dict(clip_x0=0.0), "clip_x0 must be > 0 or None, got 0.0"),
    (dict(sampler="lcm", steps=9), "LCM sampling takes 1 to 8 steps, got steps=9"),
    (dict(sampler="lcm", steps=4, lcm_original_steps=3), "lcm_original_steps=3, T=100"),
    (dict(sampler="lcm", steps=4, lcm_original_steps=200), "lcm_original_steps=200, T=100"),
  ],
)
def test_bad_settings_name_the_value_and_the_valid_ones(settings, message):
  schedule = schedules.make_schedule(num_timesteps=100)
  s = samplers.SamplerSettings(**settings)
  for call in (
    lambda: s.check(100),
    lambda: samplers.build_plan(schedule, s),
    lambda: samplers.sample(gaussian_denoiser(schedule), jnp.zeros((1, 2)), KEY, schedule, s),
  ):
    with pytest.raises(ValueError, match=re.escape(message)):
      call()


@pytest.mark.parametrize(
  "settings",
  [
    dict(steps=1),
    dict(steps=100),  # = T.
    dict(steps_offset=0),
    dict(sampler="lcm", steps=1, lcm_original_steps=1),
    dict(sampler="lcm", steps=8, lcm_original_steps=8),  # LCM_MAX_STEPS = original steps.
    dict(sampler="lcm", steps=4, lcm_original_steps=100),  # = T.
  ],
)
def test_settings_on_their_bounds_are_valid(settings):
  """Each range of test_bad_settings... is closed: its end points themselves are allowed."""
  schedule = schedules.make_schedule(num_timesteps=100)
  s = samplers.SamplerSettings(**settings)
  s.check(100)
  assert samplers.build_plan(schedule, s).num_steps >= 1
  with pytest.raises(ValueError, match=r"steps must be in \[1, T=100\], got 101"):
    samplers.SamplerSettings(steps=101).check(100)


def test_distillation_grid_on_its_bounds():
  """ddim_timesteps(T, N): N in [1, T]; the grid (n + 1) (T // N) - 1 at both ends."""
  np.testing.assert_array_equal(samplers.ddim_timesteps(100, 1), [99])
  np.testing.assert_array_equal(samplers.ddim_timesteps(100, 100), np.arange(100))
  for n in (0, 101):
    with pytest.raises(ValueError, match=rf"num_ddim_timesteps must be in \[1, T=100\], got {n}"):
      samplers.ddim_timesteps(100, n)


def test_karras_error_lists_the_samplers_that_take_it():
  with_karras = [name for name, spec in samplers.SAMPLERS.items() if spec.karras]
  assert with_karras == [
    "euler",
    "euler_ancestral",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m",
    "unipc",
  ]
  with pytest.raises(ValueError, match="samplers with karras sigmas: " + ", ".join(with_karras)):
    samplers.SamplerSettings(sampler="ddim", karras=True).check(1000)


def test_unknown_setting_names_the_valid_ones():
  schedule = schedules.make_schedule()
  with pytest.raises(TypeError, match=r"\['stpes'\]; valid ones: sampler, steps, eta"):
    samplers.sample(gaussian_denoiser(schedule), jnp.zeros((1, 2)), KEY, schedule, stpes=4)
  with pytest.raises(TypeError, match=r"\['cfg'\]"):
    samplers.SamplerSettings.from_config(_config(), cfg=None)


def test_settings_from_config_reads_sample_and_distill_and_applies_overrides():
  s = samplers.SamplerSettings.from_config(_config())
  assert s == samplers.SamplerSettings()  # the optional keys default
  assert isinstance(s.eta, float)  # a config's 0 and 0.0 make the same static jit argument

  fields = dict(
    sampler="dpmpp_2m",
    steps=20,
    timestep_spacing="leading",
    steps_offset=1,
    karras=True,
    clip_x0=1.0,
  )
  config = _config(**fields)
  s = samplers.SamplerSettings.from_config(config, sampler=None, steps=None, eta=None)
  assert s == samplers.SamplerSettings(**fields)
  s = samplers.SamplerSettings.from_config(config, steps=7, karras=False, variance=None, eta=1)
  assert (s.sampler, s.steps, s.karras, s.timestep_spacing) == ("dpmpp_2m", 7, False, "leading")
  assert repr(s.eta) == "1.0"

  student = _config(distill={}, sampler="lcm", steps=4)
  assert samplers.SamplerSettings.from_config(student).lcm_original_steps == 25
  s = samplers.SamplerSettings.from_config(student, sampler="ddpm", variance="fixed_large")
  assert (s.sampler, s.steps, s.variance, s.lcm_original_steps) == ("ddpm", 4, "fixed_large", 25)


def test_settings_from_config_defaults_to_the_samplers_spacing(monkeypatch):
  ddpm = dataclasses.replace(samplers.SAMPLERS["ddpm"], spacing="leading")
  monkeypatch.setitem(samplers.SAMPLERS, "ddpm", ddpm)
  from_config = samplers.SamplerSettings.from_config
  assert from_config(_config(sampler="ddpm")).timestep_spacing == "leading"
  assert from_config(_config(), sampler="ddpm").timestep_spacing == "leading"  # the override's
  assert from_config(_config(sampler="ddpm", timestep_spacing="linspace")).timestep_spacing == (
    "linspace"
  )
  assert from_config(_config()).timestep_spacing == "trailing"


def test_settings_from_config_checks_against_the_schedule():
  with pytest.raises(ValueError, match=re.escape("steps must be in [1, T=1000], got 2000")):
    samplers.SamplerSettings.from_config(_config(steps=2000))
  with pytest.raises(ValueError, match="LCM sampling takes 1 to 8 steps, got steps=50"):
    samplers.SamplerSettings.from_config(_config(), sampler="lcm")
  with pytest.raises(ValueError, match="valid samplers are"):
    samplers.SamplerSettings.from_config(_config(sampler="plms"))


def test_settings_are_hashable_static_jit_arguments():
  a = samplers.SamplerSettings(sampler="heun", steps=5, karras=True)
  b = samplers.SamplerSettings(sampler="heun", steps=5, karras=True)
  assert a == b and hash(a) == hash(b) and a != dataclasses.replace(a, steps=6)
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.steps = 6
  schedule = schedules.make_schedule()
  traces = []

  @functools.partial(jax.jit, static_argnames="settings")
  def run(x_T, key, settings):
    traces.append(settings)
    return samplers.sample(gaussian_denoiser(schedule), x_T, key, schedule, settings)

  x_T = jax.random.normal(KEY, (8, 1))
  x_a, x_b = run(x_T, KEY, settings=a), run(x_T, KEY, settings=b)
  assert len(traces) == 1  # an equal settings object reuses the compiled sampler
  np.testing.assert_array_equal(x_a, x_b)
  run(x_T, KEY, settings=dataclasses.replace(a, steps=6))
  assert len(traces) == 2


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_registered_sampler_builds_a_plan_and_samples(name):
  spec = samplers.SAMPLERS[name]
  assert spec.description and "\n" not in spec.description
  assert f"{name}: {spec.description}" in samplers.describe().splitlines()
  schedule = schedules.make_schedule()
  settings = samplers.SamplerSettings(sampler=name, steps=4)
  plan = samplers.build_plan(schedule, settings)
  assert plan.space in ("vp", "ve") and plan.num_steps >= settings.steps
  assert all(v.shape[0] == plan.num_steps for v in plan.infos.values())
  assert samplers.build_plan(schedule, settings, start=1).num_steps < plan.num_steps

  x_T = jax.random.normal(jax.random.key(1), (512, 1))
  run = lambda key: samplers.sample(gaussian_denoiser(schedule), x_T, key, schedule, settings)
  x = run(jax.random.key(2))
  assert x.shape == x_T.shape and bool(jnp.all(jnp.isfinite(x)))
  # Near the data N(0.5, 0.25), not the prior N(0, 1); 4 steps under-disperse (std ~0.22).
  assert abs(float(x.mean()) - MU) < 0.05 and 0.1 < float(x.std()) < 0.6
  # `deterministic` is what the registry claims: the key changes nothing exactly then.
  same = np.array_equal(x, run(jax.random.key(3)))
  assert same == spec.deterministic
  if spec.karras:
    karras = samplers.build_plan(schedule, dataclasses.replace(settings, karras=True))
    assert not np.allclose(karras.infos["t"], plan.infos["t"])


def test_a_sampler_is_a_plan_and_one_registry_entry(monkeypatch):
  # A new entry needs no other change: sample, build_plan and the checks find it by name.
  ddim = samplers.SAMPLERS["ddim"]
  monkeypatch.setitem(
    samplers.SAMPLERS,
    "ddim_leading",
    dataclasses.replace(
      ddim,
      description="DDIM on the leading grid",
      grid=lambda schedule, s: samplers.discrete_grid(schedule, s.steps, "leading"),
    ),
  )
  schedule = schedules.make_schedule()
  x_T = jax.random.normal(KEY, (4, 2))
  den = gaussian_denoiser(schedule)
  got = samplers.sample(den, x_T, KEY, schedule, sampler="ddim_leading", steps=6)
  ref = samplers.sample(
    den, x_T, KEY, schedule, sampler="ddim", steps=6, timestep_spacing="leading"
  )
  np.testing.assert_array_equal(got, ref)
  assert "ddim_leading" in samplers.SAMPLERS and "ddim_leading: DDIM" in samplers.describe()


def test_samplers_do_not_import_the_distillation_objective():
  code = "import sys, dit.diffusion.samplers; print('dit.diffusion.consistency' in sys.modules)"
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
  )
  assert out.stdout.strip() == "False"
  imports = [
    n
    for n in ast.walk(ast.parse(inspect.getsource(samplers)))
    if isinstance(n, ast.Import | ast.ImportFrom)
  ]
  names = [getattr(n, "module", None) or "" for n in imports] + [
    a.name for n in imports for a in n.names
  ]
  assert not [name for name in names if "consistency" in name]  # no lazy import either
  # The objective reuses the sampler's grid and boundary conditions under its own names.
  from dit.diffusion import consistency

  assert consistency.ddim_timesteps is samplers.ddim_timesteps
  assert consistency.boundary_conditions is samplers.boundary_conditions
