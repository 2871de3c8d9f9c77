"""Samplers for flow-matching models: ODE (Euler, Heun, midpoint), SDE (Euler-Maruyama) and
DPM-Solver++ / UniPC on flow times, each one jitted `lax.scan` (dit.diffusion.samplers' driver).

Time runs from t = 1 (noise) to t = 0 (data) in the notation of dit.diffusion.flow; the state
is x_t = alpha(t) x0 + sigma(t) eps itself, so guidance, img2img and inpainting work as for
the discrete samplers (`samplers.drive`, `editing`). Each scan step is one model
evaluation; `Plan.infos` carries per step the model time "t", the flow time "tau", the
interpolant's coefficients "a", "s" there and "a_next", "s_next" of the state after the step.

Time grids (`FlowSamplerSettings.spacing`):
  uniform:   tau = shift(linspace(t_max, 0, n + 1))[:n], then 0 (SiT's fixed-step grid; Flux's
             pipeline passes the same sigmas linspace(1, 1/n, n) to diffusers).
  diffusers: each diffusers scheduler's own default: FlowMatchEuler/Heun
             shift(linspace(1, shift(1/T), n)) (SD3's pipeline); DPMSolverMultistep
             shift(linspace(1 - 1/T, 0, n + 1))[:n] and UniPC shift(linspace(1, 1/T, n + 1))[:n]
             (use_flow_sigmas=True), whose model times are truncated to integers as diffusers'.
  custom:    `sigmas` (n,), strictly decreasing in (0, 1], shifted like the computed grids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dit.diffusion import editing, samplers
from dit.diffusion import flow as flow_lib
from dit.diffusion.flow import Flow
from dit.diffusion.samplers import Plan

Array = jax.Array
# model(x (B, ...), model time (B,)) -> the model's output (its flow.target), like x.
Model = Callable[[Array, Array], Array]

SPACINGS = ("uniform", "diffusers")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("mean", "tweedie", "euler")
TRAIN_T = 1000  # diffusers' num_train_timesteps, for its "diffusers" grids.
DPM_T_MAX = 1.0 - 1e-6  # log-SNR must stay finite at the start of the multistep solvers.
SBDM_EPS = 1e-3  # SiT's sample eps: the SBDM diffusion D(t) diverges at t = 1.


# ----------------------------------------------------------------------------- time grids


def flow_times(flow: Flow, settings: FlowSamplerSettings) -> tuple[np.ndarray, np.ndarray]:
  """(flow times tau (n,), model times (n,)) float32 of `settings`, decreasing (0 follows)."""
  n, name, T = settings.steps, settings.sampler, TRAIN_T
  shift = lambda t: flow_lib.shift_time(t, flow.shift)
  lo, hi = flow.t_range
  integer_time = False
  if settings.sigmas is not None:
    tau = shift(np.asarray(settings.sigmas, np.float64))
  elif name == "euler_maruyama":
    if settings.diffusion_form == "SBDM":
      hi = min(hi, 1.0 - SBDM_EPS)
    tau = shift(np.linspace(hi, settings.last_step_size, n))
  elif settings.spacing == "uniform":
    tau = shift(np.linspace(hi, 0.0, n + 1)[:n])
  elif name in ("euler", "heun", "midpoint"):
    tau = shift(np.linspace(1.0, shift(1.0 / T), n))
  elif name == "dpmpp_2m":
    tau, integer_time = shift(np.linspace(1.0 - 1.0 / T, 0.0, n + 1)[:n]), True
  else:  # unipc
    tau, integer_time = shift(np.linspace(1.0, 1.0 / T, n + 1)[:n]), True
  tau = np.clip(tau, lo, min(hi, DPM_T_MAX) if name in ("dpmpp_2m", "unipc") else hi)
  # diffusers' DPM-Solver and UniPC give the model int64 timesteps.
  model_t = flow.model_time(np.trunc(tau * T) / T if integer_time else tau)
  return tau.astype(np.float32), np.asarray(model_t, np.float32)


def flow_grid(flow: Flow, settings: FlowSamplerSettings) -> dict:
  """The grid of (n,) arrays: model time t, flow times tau -> tau_next, and their (a, s)."""
  tau, model_t = flow_times(flow, settings)
  tau = jnp.asarray(tau)
  tau_next = jnp.concatenate([tau[1:], jnp.zeros((1,), tau.dtype)])
  a, s = flow.alpha_sigma(tau)
  a_next, s_next = flow.alpha_sigma(tau_next)
  return {
    "t": jnp.asarray(model_t),
    "tau": tau,
    "tau_next": tau_next,
    "a": a,
    "s": s,
    "a_next": a_next,
    "s_next": s_next,
  }


# ----------------------------------------------------------------------------- samplers


def euler_plan(grid: dict) -> Plan:
  """Euler on dx/dt = u(x, t): x <- x + (t_next - t) u (diffusers' FlowMatchEuler)."""

  def step(carry, info, predict, noise):
    x = carry["x"]
    _, _, u = predict(x, info)
    return {"x": x + (info["tau_next"] - info["tau"]) * u}

  return Plan(grid, lambda x: {"x": x}, step, "vp", jnp.float32(1.0), needs_noise=False)


def _two_stage_infos(flow: Flow, tau: Array, tau_to: Array) -> dict:
  """Per-evaluation infos of a two-evaluation-per-step method: the model is evaluated at
  `tau`, and the state after the scan step is at `tau_to`."""
  a, s = flow.alpha_sigma(tau)
  a_next, s_next = flow.alpha_sigma(tau_to)
  return {
    "tau": tau,
    "tau_to": tau_to,
    "a": a,
    "s": s,
    "a_next": a_next,
    "s_next": s_next,
  }


def heun_plan(grid: dict, flow: Flow) -> Plan:
  """Heun's method (diffusers' FlowMatchHeun): 2n - 1 evaluations for n grid points.

  A predictor (Euler) evaluation at t_j and, for every step not ending at t = 0, a corrector
  evaluation at t_{j+1} that averages the two slopes; the last step is Euler.
  """
  n = grid["tau"].shape[0]
  idx = np.concatenate([[0], np.repeat(np.arange(1, n), 2)])
  first = np.ones(2 * n - 1, bool)
  first[1::2] = False
  tau = grid["tau"][idx]
  tau_to = jnp.where(first, grid["tau_next"][idx], tau)
  infos = _two_stage_infos(flow, tau, tau_to)
  infos.update(t=grid["t"][idx], first=jnp.asarray(first))

  def init(x):
    return {"x": x, "x_prev": x, "u_prev": jnp.zeros_like(x), "dt": jnp.zeros((), x.dtype)}

  def step(carry, info, predict, noise):
    x = carry["x"]
    _, _, u = predict(x, info)
    dt = info["tau_to"] - info["tau"]
    f = info["first"]
    corrector = carry["x_prev"] + 0.5 * (carry["u_prev"] + u) * carry["dt"]
    return {
      "x": jnp.where(f, x + u * dt, corrector),
      "x_prev": jnp.where(f, x, carry["x_prev"]),
      "u_prev": jnp.where(f, u, carry["u_prev"]),
      "dt": jnp.where(f, dt, carry["dt"]),
    }

  return Plan(infos, init, step, "vp", jnp.float32(1.0), single_step=False, needs_noise=False)


def midpoint_plan(grid: dict, flow: Flow) -> Plan:
  """The explicit midpoint method: u at t_j, then x <- x + dt u(x + dt/2 u, t_j + dt/2).

  2n evaluations; the midpoint of the last step is at t_{n-1} / 2 > 0.
  """
  n = grid["tau"].shape[0]
  idx = np.repeat(np.arange(n), 2)
  first = np.tile([True, False], n)
  start, end = grid["tau"][idx], grid["tau_next"][idx]
  mid = 0.5 * (start + end)
  tau = jnp.where(first, start, mid)
  tau_to = jnp.where(first, mid, end)
  infos = _two_stage_infos(flow, tau, tau_to)
  infos.update(t=flow.model_time(tau), first=jnp.asarray(first))

  def init(x):
    return {"x": x, "x_prev": x}

  def step(carry, info, predict, noise):
    x = carry["x"]
    _, _, u = predict(x, info)
    f = info["first"]
    half = info["tau_to"] - info["tau"]  # dt / 2 on both evaluations.
    return {
      "x": jnp.where(f, x + half * u, carry["x_prev"] + 2.0 * half * u),
      "x_prev": jnp.where(f, x, carry["x_prev"]),
    }

  return Plan(infos, init, step, "vp", jnp.float32(1.0), single_step=False, needs_noise=False)


def diffusion_coefficient(flow: Flow, tau: Array, form: str, norm: float) -> Array:
  """SiT's diffusion term D(t) (the SDE's noise is sqrt(2 D dt)), in this module's time.

  SiT's time is s = 1 - t; "SBDM" makes the SDE the reverse of the interpolant's own
  forward SDE (the DDPM/score-SDE choice) and diverges at t = 1 for linear and gvp.
  """
  if form not in DIFFUSION_FORMS:
    raise ValueError(f"Unknown diffusion form {form!r}; expected one of {DIFFUSION_FORMS}")
  s_time = 1.0 - tau
  if form == "constant":
    return jnp.full_like(tau, norm)
  if form == "SBDM":
    a, s = flow.alpha_sigma(tau)
    da, ds = flow.derivatives(tau)
    return norm * (s * ds - s**2 * da / a)
  if form == "sigma":
    return norm * flow.alpha_sigma(tau)[1]
  if form == "linear":
    return norm * tau
  if form == "decreasing":
    return 0.25 * (norm * jnp.cos(jnp.pi * s_time) + 1.0) ** 2
  return norm * jnp.sin(jnp.pi * s_time) ** 2


def euler_maruyama_plan(grid: dict, flow: Flow, settings: FlowSamplerSettings) -> Plan:
  """Euler-Maruyama on the reverse SDE with diffusion D(t) (SiT's SDE sampler):

    dx = [u - D score] dt + sqrt(2 D) dW,  score = -eps / sigma,  dt < 0,
  on n - 1 steps down to t = last_step_size, then a last step to t = 0 without noise:
  "mean" (the SDE drift), "euler" (the ODE drift) or "tweedie" (the predicted x0).
  """
  n = grid["tau"].shape[0]
  d = diffusion_coefficient(flow, grid["tau"], settings.diffusion_form, settings.diffusion_norm)
  last = np.arange(n) == n - 1
  infos = dict(grid, D=d, last=jnp.asarray(last))
  rule = settings.last_step

  def step(carry, info, predict, noise):
    x = carry["x"]
    x0, eps, u = predict(x, info)
    dt = info["tau_next"] - info["tau"]
    drift = u + info["D"] * eps / info["s"]  # u - D * score
    sde = x + drift * dt + jnp.sqrt(2.0 * info["D"] * -dt) * noise
    if rule == "mean":
      final = x + drift * dt
    elif rule == "euler":
      final = x + u * dt
    else:
      final = x0
    return {"x": jnp.where(info["last"], final, sde)}

  return Plan(infos, lambda x: {"x": x}, step, "vp", jnp.float32(1.0))


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class FlowSamplerSpec:
  description: str
  plan: Callable[[dict, Flow, FlowSamplerSettings], Plan]
  deterministic: bool = True


FLOW_SAMPLERS: dict[str, FlowSamplerSpec] = {
  "euler": FlowSamplerSpec(
    "Euler ODE steps on the velocity (diffusers' FlowMatchEulerDiscreteScheduler)",
    lambda g, f, s: euler_plan(g),
  ),
  "heun": FlowSamplerSpec(
    "Heun's 2nd-order ODE method, 2 * steps - 1 evaluations (FlowMatchHeunDiscreteScheduler)",
    lambda g, f, s: heun_plan(g, f),
  ),
  "midpoint": FlowSamplerSpec(
    "explicit midpoint 2nd-order ODE method, 2 * steps evaluations",
    lambda g, f, s: midpoint_plan(g, f),
  ),
  "euler_maruyama": FlowSamplerSpec(
    "Euler-Maruyama on the reverse SDE (SiT's SDE sampler; diffusion_form, last_step)",
    lambda g, f, s: euler_maruyama_plan(g, f, s),
    deterministic=False,
  ),
  "dpmpp_2m": FlowSamplerSpec(
    "DPM-Solver++(2M) on flow times (DPMSolverMultistepScheduler, use_flow_sigmas=True)",
    lambda g, f, s: samplers.dpmpp_plan(g, order=2),
  ),
  "unipc": FlowSamplerSpec(
    "UniPC (bh2) on flow times (UniPCMultistepScheduler, use_flow_sigmas=True)",
    lambda g, f, s: samplers.unipc_plan(g),
  ),
}


def describe() -> str:
  """One line per flow sampler ("name: description"), for --help."""
  return "\n".join(f"{name}: {spec.description}" for name, spec in FLOW_SAMPLERS.items())


# ----------------------------------------------------------------------------- settings


def _is_int(v: Any) -> bool:
  return isinstance(v, int | np.integer) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class FlowSamplerSettings:
  """Every setting of a flow sampler; frozen and hashable (a static jit argument).

  sampler: a FLOW_SAMPLERS name. steps: grid points (model evaluations for euler, dpmpp_2m,
    unipc and euler_maruyama; heun makes 2 * steps - 1, midpoint 2 * steps).
  spacing: "uniform" | "diffusers" (module docstring). sigmas: custom flow times (steps,),
    strictly decreasing in (0, 1]; they replace the grid (and set steps).
  diffusion_form, diffusion_norm, last_step, last_step_size: euler_maruyama's SDE (SiT's
    defaults: "sigma", 1.0, "mean", 0.04).
  clip_x0: clip the predicted x0 to +-clip_x0 (None: no clipping).
  """

  sampler: str = "euler"
  steps: int = 16
  spacing: str = "uniform"
  sigmas: tuple[float, ...] | None = None
  diffusion_form: str = "sigma"
  diffusion_norm: float = 1.0
  last_step: str = "mean"
  last_step_size: float = 0.04
  clip_x0: float | None = None

  def check(self) -> None:
    """Raises ValueError naming a bad setting and the valid values."""
    if self.sampler not in FLOW_SAMPLERS:
      extra = ""
      if self.sampler in samplers.SAMPLERS:
        extra = f" ({self.sampler!r} is a sampler for discrete-time diffusion models)"
      raise ValueError(
        f"Unknown flow sampler {self.sampler!r}{extra}; flow samplers: {', '.join(FLOW_SAMPLERS)}"
      )
    if not _is_int(self.steps) or self.steps < 1:
      raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
    if self.spacing not in SPACINGS:
      raise ValueError(f"Unknown flow spacing {self.spacing!r}; expected one of {SPACINGS}")
    if self.sigmas is not None:
      check_sigmas(self.sigmas)
      if len(self.sigmas) != self.steps:
        raise ValueError(
          f"{len(self.sigmas)} custom sigmas for steps={self.steps}; give both equal"
        )
    if self.diffusion_form not in DIFFUSION_FORMS:
      raise ValueError(
        f"Unknown diffusion_form {self.diffusion_form!r}; expected one of {DIFFUSION_FORMS}"
      )
    if self.last_step not in LAST_STEPS:
      raise ValueError(f"Unknown last_step {self.last_step!r}; expected one of {LAST_STEPS}")
    if not 0.0 < self.last_step_size < 1.0:
      raise ValueError(f"last_step_size must be in (0, 1), got {self.last_step_size!r}")
    if self.sampler == "euler_maruyama" and self.steps < 2:
      raise ValueError("euler_maruyama needs steps >= 2 (the SDE steps and the last step)")
    if self.clip_x0 is not None and not self.clip_x0 > 0:
      raise ValueError(f"clip_x0 must be > 0 or None, got {self.clip_x0!r}")

  @classmethod
  def from_config(cls, config: Any, **overrides: Any) -> FlowSamplerSettings:
    """The settings of config.sample (its fields named like ours), then non-None overrides."""
    fields = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise TypeError(f"Unknown flow sampler settings {unknown}; valid ones: {sorted(fields)}")
    kw = {k: v for k, v in config.sample.items() if k in fields}
    kw.update(overrides)
    if kw.get("sigmas") is not None:
      kw["sigmas"] = tuple(float(v) for v in kw["sigmas"])
      kw.setdefault("steps", len(kw["sigmas"]))
    settings = cls(**kw)
    settings.check()
    return settings


def check_sigmas(sigmas) -> None:
  """Custom flow times: strictly decreasing, in (0, 1]; the first bad value is named."""
  values = [float(v) for v in sigmas]
  if not values:
    raise ValueError("custom sigmas are empty")
  for i, v in enumerate(values):
    if not 0.0 < v <= 1.0:
      raise ValueError(f"custom sigma {v} at index {i} is outside (0, 1]")
    if i and v >= values[i - 1]:
      raise ValueError(
        f"custom sigmas must be strictly decreasing: {v} at index {i} follows {values[i - 1]}"
      )


# ----------------------------------------------------------------------------- driver


def make_predict(model: Model, flow: Flow, clip_x0: float | None) -> samplers.Predict:
  """predict(x, info) -> (x0, eps, velocity) of the model at the info's flow time."""

  def predict(x, info):
    t = jnp.full((x.shape[0],), info["t"], jnp.float32)
    out = model(x, t)
    if out.shape != x.shape:
      raise ValueError(f"model output shape {out.shape} != sample shape {x.shape}")
    out = flow.model_output_sign() * out
    tau = info["tau"]
    x0, eps = flow.to_x0_eps(out, x, tau)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      eps = (x - info["a"] * x0) / info["s"]
    elif flow.target == "velocity":
      return x0, eps, out  # The model's own velocity, as diffusers steps with it.
    return x0, eps, flow.velocity(x0, eps, tau)

  return predict


def build_plan(flow: Flow, settings: FlowSamplerSettings, start: int = 0) -> Plan:
  """The plan of `settings` for `flow`; `start` drops the first grid points (img2img)."""
  settings.check()
  grid = flow_grid(flow, settings)
  grid = {k: v[start:] for k, v in grid.items()}
  return FLOW_SAMPLERS[settings.sampler].plan(grid, flow, settings)


def sample(
  model: Model,
  x_T: Array,
  key: Array,
  flow: Flow,
  settings: FlowSamplerSettings | None = None,
  *,
  x_init: Array | None = None,
  strength: float = 1.0,
  mask: Array | None = None,
  resample: int = 1,
  noise: Array | None = None,
  return_trajectory: bool = False,
  **setting_kwargs: Any,
):
  """Draws samples x_0 (B, ...) from x_T ~ N(0, I) (B, ...), every step in one `lax.scan`.

  model(x, model time (B,)) -> output of type flow.target (guidance wraps it, as
  `guidance.cfg_denoise`). settings: default FlowSamplerSettings(), with setting_kwargs
  replacing its fields. x_init/strength (img2img), mask/resample (inpainting, RePaint),
  noise (per-step noise (n, *x_T.shape)), return_trajectory: as `samplers.sample`.
  """
  settings = dataclasses.replace(settings or FlowSamplerSettings(), **setting_kwargs)
  settings.check()
  start = editing.start_index(settings.steps, x_T.shape, x_init, strength, mask, resample)
  plan = build_plan(flow, settings, start)
  predict = make_predict(model, flow, settings.clip_x0)
  return samplers.drive(
    plan, predict, x_T, key, x_init=x_init, mask=mask, start=start, resample=resample,
    sampler=settings.sampler, noise=noise, return_trajectory=return_trajectory,
  )  # fmt: skip
