"""Samplers against diffusers' schedulers under diffusers' own configs, step by step.

Each case runs one of our samplers and the diffusers scheduler it matches on diffusers' own
alphas_cumprod (`schedules.schedule_from_alphas_cumprod`, no substitution into diffusers),
with diffusers' own init_noise_sigma and scale_model_input and the same noise fed to both,
and compares the timesteps and the state after every step. Configs: each scheduler's
defaults (its default spacing), Stable Diffusion's, each spacing, custom timesteps/sigmas
and the variance / prediction / Karras options. Tolerance: 1e-5 of max(1, max |x|) per step
in float32 (measured: at most 1e-6).

The ones diffusers does differently, by design (docs/samplers.md): DDIM with clip_sample
follows use_clipped_model_output=True (eps re-derived from the clipped x0); DDPM adds no
noise on its last step even where that step's timestep is > 0 (ADM), which matters only for
fixed_large / learned_range on grids that end above t = 0, so those run where it ends at 0.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from diffusers_ref import SHAPE, jax_model, make_scheduler, run_diffusers, settings_of, to_torch

from dit.diffusion import samplers, schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# 7 steps: no spacing lands on integers only (999 / 6 and 1000 / 7 are fractional), and
# DDIM's t - T // 7 is not the next trailing or linspace grid point.
STEPS = 7
LCM_STEPS = 4
SCHEDULERS = {  # sampler: (diffusers class, config beyond the class defaults)
  "ddpm": ("DDPMScheduler", {}),
  "ddim": ("DDIMScheduler", {}),
  "euler": ("EulerDiscreteScheduler", {}),
  "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
  "heun": ("HeunDiscreteScheduler", {}),
  "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
  "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
  "dpmpp_3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
  "unipc": ("UniPCMultistepScheduler", {}),
  "lcm": ("LCMScheduler", {}),
}
# Stable Diffusion v1's scheduler config; each scheduler takes the keys it has.
STABLE_DIFFUSION = dict(
  beta_schedule="scaled_linear",
  beta_start=0.00085,
  beta_end=0.012,
  set_alpha_to_one=False,
  steps_offset=1,
  timestep_spacing="leading",
  clip_sample=False,
)
INT_TIMESTEPS = (999, 850, 600, 450, 200, 50, 10)
FRACTIONAL_TIMESTEPS = (999.0, 871.5, 702.25, 451.75, 300.5, 120.25, 0.0)
SIGMAS = (*np.geomspace(120.0, 0.05, STEPS).tolist(), 0.0)
LCM_TIMESTEPS = (999, 759, 499, 259)  # on LCM's default 50-step distillation grid


@dataclasses.dataclass(frozen=True)
class Case:
  sampler: str
  config: dict = dataclasses.field(default_factory=dict)
  custom: dict = dataclasses.field(default_factory=dict)  # set_timesteps(timesteps=/sigmas=)
  eta: float = 0.0


def _cases() -> dict[str, Case]:
  cases = {}
  for name in SCHEDULERS:
    cases[f"{name}-default"] = Case(name)
    cases[f"{name}-stable_diffusion"] = Case(name, STABLE_DIFFUSION)
    for spacing in samplers.SPACINGS:
      cases[f"{name}-{spacing}"] = Case(name, {"timestep_spacing": spacing})
  for name in ("ddpm", "dpmpp_2m"):
    cases[f"{name}-custom"] = Case(name, custom={"timesteps": INT_TIMESTEPS})
  for name in ("euler", "heun"):
    cases[f"{name}-custom"] = Case(name, custom={"timesteps": FRACTIONAL_TIMESTEPS})
  cases["euler-custom_sigmas"] = Case("euler", custom={"sigmas": SIGMAS})
  cases["lcm-custom"] = Case("lcm", custom={"timesteps": LCM_TIMESTEPS})
  v, karras = {"prediction_type": "v_prediction"}, {"use_karras_sigmas": True}
  cases.update(
    {
      "ddpm-fixed_large": Case("ddpm", {"variance_type": "fixed_large"}),
      "ddpm-learned_range": Case("ddpm", {"variance_type": "learned_range"}),
      "ddim-eta": Case("ddim", eta=1.0),
      "ddim-eta-stable_diffusion": Case("ddim", STABLE_DIFFUSION, eta=1.0),
      "ddim-v": Case("ddim", v),
      "euler-karras": Case("euler", karras),
      "euler-v": Case("euler", v),
      "heun-karras-v": Case("heun", {**karras, **v}),
      "dpmpp_2m-karras": Case("dpmpp_2m", karras),
      "dpmpp_2m-v": Case("dpmpp_2m", v),
      "unipc-karras": Case("unipc", karras),
    }
  )
  return cases


CASES = _cases()


@functools.cache
def _runner(sampler, eta, variance, clip_x0, prediction, learn_sigma):
  """One jitted sampler per step function, shared by every grid (spacing, config): the
  grid arrays and noise scale are its arguments, so a new grid costs no compilation."""
  proto_settings = samplers.SamplerSettings(sampler, steps=LCM_STEPS, eta=eta, variance=variance)
  proto = samplers.build_plan(schedules.make_schedule(), proto_settings)
  predict = samplers.make_predict(
    jax_model(learn_sigma), proto.space, prediction, learn_sigma, clip_x0
  )

  @jax.jit
  def run(infos, noise_scale, x_T, noise):
    # `sample` without the settings: its initial state, predict and scan.
    plan = dataclasses.replace(proto, infos=infos, noise_scale=noise_scale)
    x, _ = samplers._initial_state(plan, x_T, None, None, 0, None)
    return samplers.run_plan(plan, predict, x, noise=noise, return_trajectory=True)

  return run


def _setup(case: Case):
  """diffusers' scheduler with its timesteps set, our schedule and settings, and inputs."""
  cls_name, config = SCHEDULERS[case.sampler]
  sched = make_scheduler(diffusers, cls_name, **config, **case.config)
  ab = sched.alphas_cumprod.numpy()
  schedule = schedules.schedule_from_alphas_cumprod(ab)
  np.testing.assert_array_equal(np.asarray(schedule.alphas_cumprod), ab)  # the same table
  steps = LCM_STEPS if case.sampler == "lcm" else STEPS
  if case.custom:
    sched.set_timesteps(**{k: list(v) for k, v in case.custom.items()})
  else:
    sched.set_timesteps(steps)
  settings, model_kw = settings_of(sched, case.sampler, steps, eta=case.eta, **case.custom)
  n = len(sched.timesteps)
  rng = np.random.default_rng(0)
  x_T = rng.standard_normal(SHAPE).astype(np.float32)
  noises = rng.standard_normal((n, *SHAPE)).astype(np.float32)
  return sched, schedule, settings, model_kw, x_T, noises


def _reference(case, sched, model_kw, x_T, noises, monkeypatch):
  step_kw = {}
  if case.sampler == "ddim":
    # With clip_sample (DDIM's default) we re-derive eps from the clipped x0, as Glide.
    step_kw = dict(eta=case.eta, use_clipped_model_output=True)
  x0 = to_torch(torch, x_T) * sched.init_noise_sigma
  noises = [to_torch(torch, z) for z in noises]
  return run_diffusers(torch, monkeypatch, sched, x0, noises, model_kw["learn_sigma"], **step_kw)


def _assert_close(ours, ref):
  ours = np.asarray(ours)
  assert ours.shape == ref.shape
  scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4), keepdims=True))
  np.testing.assert_allclose(ours / scale, ref / scale, atol=1e-5, rtol=0)


def _check_grid(plan, sched, settings):
  t_ref = sched.timesteps.numpy()
  # Timesteps of Karras or custom sigmas come from float32 log-sigma interpolation
  # (diffusers': float64; measured up to 5e-7 relative); all others are exactly diffusers'.
  rtol = 2e-6 if settings.karras or settings.sigmas is not None else 0
  np.testing.assert_allclose(np.asarray(plan.infos["t"]), t_ref, rtol=rtol, atol=0)
  np.testing.assert_allclose(float(plan.noise_scale), float(sched.init_noise_sigma), rtol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers_step_by_step(name, monkeypatch):
  case = CASES[name]
  sched, schedule, settings, model_kw, x_T, noises = _setup(case)
  plan = samplers.build_plan(schedule, settings)
  _check_grid(plan, sched, settings)
  run = _runner(case.sampler, settings.eta, settings.variance, settings.clip_x0, **model_kw)
  x, traj = run(plan.infos, plan.noise_scale, x_T, noises)
  ref = _reference(case, sched, model_kw, x_T, noises, monkeypatch)
  _assert_close(traj, ref)
  _assert_close(x[None], ref[-1:])


@pytest.mark.parametrize("name", ["ddpm-default", "euler-default"])
def test_public_sample_matches_diffusers(name, monkeypatch):
  """`samplers.sample` itself (settings checked, the grid built inside jit) on one VP and
  one VE sampler, so the shared runner above is `sample`'s own path."""
  case = CASES[name]
  sched, schedule, settings, model_kw, x_T, noises = _setup(case)
  sample = jax.jit(
    functools.partial(
      samplers.sample, jax_model(), settings=settings, return_trajectory=True, **model_kw
    )
  )
  _, traj = sample(x_T, jax.random.key(0), schedule, noise=noises)
  _assert_close(traj, _reference(case, sched, model_kw, x_T, noises, monkeypatch))


def test_every_sampler_and_spacing_is_covered():
  for name, spec in samplers.SAMPLERS.items():
    assert spec.diffusers.startswith(SCHEDULERS[name][0])
    for spacing in ("default", "stable_diffusion", *samplers.SPACINGS):
      assert f"{name}-{spacing}" in CASES
