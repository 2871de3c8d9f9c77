"""Samplers: analytic convergence, structure (one trace, no PRNG op when deterministic),
errors, custom grids, the registry and the settings. Step-by-step parity with diffusers'
schedulers is in test_samplers_diffusers.py."""

import ast
import dataclasses
import functools
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


RANDOM_PRIMITIVES = ("random_bits", "random_split", "random_fold_in", "threefry2x32")


def _random_ops(fn, *args) -> set[str]:
  """The PRNG primitives anywhere in fn's jaxpr (the scan body included)."""
  text = str(jax.make_jaxpr(fn)(*args))
  return {name for name in RANDOM_PRIMITIVES if name in text}


@pytest.mark.parametrize(
  "sampler,eta", [(name, 0.0) for name in samplers.SAMPLERS] + [("ddim", 1.0)]
)
def test_deterministic_samplers_trace_no_random_draw(sampler, eta):
  # A draw per scan step costs compile time and memory even when the step ignores it.
  schedule = schedules.make_schedule(num_timesteps=100)
  x_T = jnp.zeros((2, 3))
  run = lambda x, key: samplers.sample(
    gaussian_denoiser(schedule), x, key, schedule, sampler=sampler, steps=4, eta=eta
  )
  ops = _random_ops(run, x_T, jax.random.key(0))
  if samplers.SAMPLERS[sampler].deterministic and eta == 0:
    assert not ops
  else:
    assert "random_bits" in ops  # the check sees a draw where there is one


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_deterministic_samplers_still_draw_for_inpainting(sampler):
  """The paste (and RePaint's re-noising) of a deterministic sampler keep their fresh noise."""
  schedule = schedules.make_schedule(num_timesteps=100)
  x_T = jax.random.normal(jax.random.key(1), (4, 6))
  x_init = jnp.full(x_T.shape, 0.5)
  mask = jnp.asarray(np.arange(6) < 3, jnp.float32)[None]
  kw = dict(
    sampler=sampler, steps=5, x_init=x_init, mask=mask, resample=2 if sampler == "ddim" else 1
  )
  run = jax.jit(
    lambda key: samplers.sample(
      gaussian_denoiser(schedule), x_T, key, schedule, return_trajectory=True, **kw
    )
  )
  assert "random_bits" in _random_ops(run, jax.random.key(0))
  (a, traj_a), (b, traj_b) = run(jax.random.key(2)), run(jax.random.key(3))
  # The known half is x_init noised with fresh noise after every step but the last.
  assert not np.allclose(traj_a[:-1, :, :3], traj_b[:-1, :, :3])
  np.testing.assert_allclose(a[:, :3], 0.5, atol=1e-6)
  if kw["resample"] > 1:  # RePaint's re-noising reaches the unknown half too
    assert not np.allclose(a[:, 3:], b[:, 3:])


# ----------------------------------------------------------------------------- custom grids


def test_ddim_steps_to_t_minus_T_over_steps_and_set_alpha_to_one():
  """diffusers' DDIM (ddim_step="diffusers") goes from t to t - T // n (not always the next
  grid point), and where that is < 0 to final_alpha_cumprod: 1, or alphas_cumprod[0] with
  set_alpha_to_one=False (Stable Diffusion). dit's default steps to the next grid point."""
  schedule = schedules.make_schedule()
  ab = np.asarray(schedule.alphas_cumprod)
  kw = dict(sampler="ddim", steps=7)  # trailing: 999, 856, ...
  plan = samplers.build_plan(schedule, **kw, ddim_step="diffusers")
  ts = np.asarray(plan.infos["t"]).astype(int)
  np.testing.assert_array_equal(ts, [999, 856, 713, 570, 428, 285, 142])
  # 1000 // 7 = 142: 999 -> 857, ..., and the last step 142 -> 0 (alphas_cumprod[0], not 1).
  np.testing.assert_array_equal(plan.infos["ab_next"], ab[ts - 142])
  grid = samplers.build_plan(schedule, **kw)
  np.testing.assert_array_equal(grid.infos["ab_next"][:-1], ab[ts[1:]])
  assert float(grid.infos["ab_next"][-1]) == 1.0
  # On a leading grid (diffusers' default) the two rules are the same plan.
  lead = dict(sampler="ddim", steps=7, timestep_spacing="leading")
  np.testing.assert_array_equal(
    samplers.build_plan(schedule, **lead, ddim_step="diffusers").infos["ab_next"],
    samplers.build_plan(schedule, **lead).infos["ab_next"],
  )
  plan = samplers.build_plan(schedule, sampler="ddim", steps=10)  # 999, ..., 99 -> -1
  assert float(plan.infos["ab_next"][-1]) == 1.0
  sd = samplers.build_plan(schedule, sampler="ddim", steps=10, set_alpha_to_one=False)
  assert float(sd.infos["ab_next"][-1]) == ab[0]
  np.testing.assert_array_equal(sd.infos["ab_next"][:-1], plan.infos["ab_next"][:-1])
  np.testing.assert_array_equal(sd.infos["ab_next"][:-1], ab[np.arange(899, 0, -100)])
  # Other samplers always end at x0 (alphas_cumprod 1, sigma 0).
  for name in ("ddpm", "lcm", "euler", "dpmpp_2m"):
    other = samplers.build_plan(schedule, sampler=name, steps=4, set_alpha_to_one=False)
    assert float(other.infos["s_next"][-1]) == 0.0


@pytest.mark.parametrize(
  "sampler,spacing",
  [("ddpm", "linspace"), ("ddim", "trailing"), ("euler", "linspace"), ("heun", "leading")]
  + [("dpmpp_2m", "linspace"), ("unipc", "leading"), ("lcm", "trailing")],
)
def test_custom_timesteps_equal_to_the_grid_give_the_same_plan(sampler, spacing):
  schedule = schedules.make_schedule()
  s = samplers.SamplerSettings(sampler=sampler, steps=5, timestep_spacing=spacing)
  ts = samplers.sampler_timesteps(schedule.T, s)
  # An array, stored as a tuple; the spacing still sets a k-sigma sampler's first noise scale.
  custom = samplers.SamplerSettings(sampler=sampler, timesteps=ts, timestep_spacing=spacing)
  assert custom.steps == 5 and isinstance(custom.timesteps, tuple)
  ref, got = samplers.build_plan(schedule, s), samplers.build_plan(schedule, custom)
  assert ref.infos.keys() == got.infos.keys()
  for key in ref.infos:
    np.testing.assert_array_equal(got.infos[key], ref.infos[key], err_msg=key)
  np.testing.assert_array_equal(got.noise_scale, ref.noise_scale)


def test_custom_fractional_timesteps_and_sigmas_interpolate_the_table():
  schedule = schedules.make_schedule()
  ab = np.asarray(schedule.alphas_cumprod)
  k = np.sqrt((1 - ab) / ab).astype(np.float64)  # in float32 from alphas_cumprod, as diffusers
  plan = samplers.build_plan(schedule, sampler="euler", timesteps=(500.25, 10.0))
  # Linear in sigma between the neighbouring integer timesteps, as diffusers' np.interp.
  np.testing.assert_allclose(plan.infos["k"], [0.75 * k[500] + 0.25 * k[501], k[10]], rtol=1e-6)
  np.testing.assert_array_equal(plan.infos["t"], [500.25, 10.0])
  sigmas = (float(k[900]), float(k[400]), float(k[30]), 0.0)
  plan = samplers.build_plan(schedule, sampler="euler", sigmas=sigmas)
  assert plan.num_steps == 3
  np.testing.assert_allclose(plan.infos["k"], sigmas[:-1], rtol=1e-6)
  np.testing.assert_allclose(plan.infos["k_next"], sigmas[1:], rtol=1e-6)
  np.testing.assert_allclose(plan.infos["t"], [900, 400, 30], atol=1e-2)  # sigma -> t inverts


T_SMALL = 100


@pytest.mark.parametrize(
  "settings,message",
  [
    # The first bad value and its index, whatever comes after it.
    (dict(timesteps=(99, 50, 50, 10)), "timesteps[2] = 50 is not below timesteps[1] = 50"),
    (dict(timesteps=(99, 60, 70, 100)), "timesteps[2] = 70 is not below timesteps[1] = 60"),
    (dict(timesteps=(100, 50)), "timesteps[0] = 100 is outside [0, T=100)"),
    (dict(timesteps=(99, 50, -1)), "timesteps[2] = -1 is outside [0, T=100)"),
    (dict(timesteps=(99, float("nan"))), "timesteps[1] = nan is outside [0, T=100)"),
    (dict(timesteps=(99, 50.5, 60)), "timesteps[1] = 50.5 is not an integer, which sampler 'ddim'"),
    (dict(sampler="euler", timesteps=(99.5, 99.5)), "timesteps[1] = 99.5 is not below"),
    (dict(sampler="euler", timesteps=(100.0,)), "timesteps[0] = 100.0 is outside [0, T=100)"),
    (dict(timesteps=()), "custom timesteps must hold at least one timestep"),
    (dict(sampler="euler", sigmas=(5.0, 5.0, 0.0)), "sigmas[1] = 5.0 is not below sigmas[0]"),
    (dict(sampler="euler", sigmas=(5.0, 1.0, -0.1)), "sigmas[2] = -0.1 must be finite and > 0"),
    (dict(sampler="euler", sigmas=(5.0, 0.0, 0.0)), "sigmas[1] = 0.0 must be finite and > 0"),
    (dict(sampler="euler", sigmas=(5.0,)), "custom sigmas need n + 1 >= 2 values"),
    (dict(sampler="ddim", sigmas=(5.0, 0.0)), "not supported by sampler 'ddim'; samplers with "),
    (dict(sampler="euler", timesteps=(9,), sigmas=(1.0, 0.0)), "timesteps or sigmas, not both"),
    (dict(sampler="euler", timesteps=(9,), karras=True), "they take karras=False"),
  ],
)
def test_bad_custom_grids_name_the_first_bad_value(settings, message):
  schedule = schedules.make_schedule(num_timesteps=T_SMALL)
  s = samplers.SamplerSettings(**settings)
  den = gaussian_denoiser(schedule)
  for call in (
    lambda: s.check(T_SMALL),
    lambda: samplers.build_plan(schedule, s),
    lambda: samplers.sample(den, jnp.zeros((1, 2)), KEY, schedule, s),
  ):
    with pytest.raises(ValueError, match=re.escape(message)):
      call()


@pytest.mark.parametrize(
  "settings",
  [
    dict(timesteps=(99, 0)),  # both ends of [0, T)
    dict(timesteps=(99.0, 98.0)),  # integral floats for an integer sampler
    dict(sampler="euler", timesteps=(99.999, 0.0)),
    dict(sampler="euler", sigmas=(5.0, 1e-6, 0.0)),  # the final sigma may be 0
    dict(sampler="euler", sigmas=(5.0, 1.0)),  # or not
    dict(sampler="dpmpp_2m", timesteps=(99,)),
  ],
)
def test_custom_grids_on_their_bounds_are_valid(settings):
  schedule = schedules.make_schedule(num_timesteps=T_SMALL)
  s = samplers.SamplerSettings(**settings)
  s.check(T_SMALL)
  x = samplers.sample(gaussian_denoiser(schedule), jnp.ones((2, 1)), KEY, schedule, s)
  assert bool(jnp.all(jnp.isfinite(x)))


def test_custom_grids_are_hashable_tuples_that_set_steps():
  s = samplers.SamplerSettings(sampler="euler", steps=50, timesteps=[999, 500.5, 0])
  assert s.timesteps == (999, 500.5, 0) and s.steps == 3
  assert hash(s) == hash(samplers.SamplerSettings(sampler="euler", timesteps=(999, 500.5, 0)))
  s = samplers.SamplerSettings(sampler="euler", sigmas=np.array([10.0, 1.0, 0.0], np.float32))
  assert s.sigmas == (10.0, 1.0, 0.0) and s.steps == 2 and hash(s)
  with pytest.raises(
    ValueError, match=r"custom timesteps must be a 1-D sequence, got shape \(1, 2\)"
  ):
    samplers.SamplerSettings(timesteps=[[1, 2]])


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

  custom = _config(sampler="euler", timesteps=[999, 500.5, 0.0], set_alpha_to_one=False)
  s = samplers.SamplerSettings.from_config(custom)
  assert (s.timesteps, s.steps, s.set_alpha_to_one) == ((999, 500.5, 0.0), 3, False)
  with pytest.raises(ValueError, match=re.escape("custom timesteps[1] = 1000 is outside")):
    samplers.SamplerSettings.from_config(_config(sampler="ddim", timesteps=[999, 1000]))


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
  # --help states each sampler's default spacing and the diffusers scheduler it matches.
  (line,) = [ln for ln in samplers.describe().splitlines() if ln.startswith(f"{name}: ")]
  assert line.startswith(f"{name}: {spec.description} [") and spec.diffusers in line
  assert (f"spacing {spec.spacing}" in line) == spec.spaced
  schedule = schedules.make_schedule()
  settings = samplers.SamplerSettings(sampler=name, steps=4)
  plan = samplers.build_plan(schedule, settings)
  assert plan.needs_noise == (not spec.deterministic)
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
