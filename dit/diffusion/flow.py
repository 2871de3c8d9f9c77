"""Flow matching: interpolants, model targets, timestep densities, time shifts and the loss.

Notation (as SD3, Flux and diffusers' FlowMatch schedulers): time t in [0, 1], t = 0 data,
t = 1 noise, and
  x_t = alpha(t) x0 + sigma(t) eps,   velocity u_t = d x_t / dt = alpha'(t) x0 + sigma'(t) eps.
Interpolants (SiT's paths, in this time direction):
  linear: alpha = 1 - t, sigma = t (rectified flow; u = eps - x0).
  gvp:    alpha = cos(pi t / 2), sigma = sin(pi t / 2).
  vp:     alpha = exp(-t^2 (b_max - b_min) / 4 - t b_min / 2), sigma = sqrt(1 - alpha^2),
          b_min = 0.1, b_max = 20 (the DDPM SDE; sigma' diverges at t = 0, so its times
          stay in [eps, 1 - eps]).
The model predicts one of the targets "velocity" (u), "noise" (eps) or "x0"; `to_x0_eps`
and `target` convert exactly between them at any t where the 2x2 system is regular.

The model's own time input is `Flow.model_time(t)`: t * time_scale (1000 for dit's models,
whose timestep embedding was made for [0, 1000); SD3/Flux use the same), or for SiT's
checkpoints (reverse_time) 1 - t: SiT counts time from noise to data, so its velocity is
the negative of ours.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

INTERPOLANTS = ("linear", "gvp", "vp")
TARGETS = ("velocity", "noise", "x0")
TIME_SAMPLERS = ("uniform", "logit_normal", "mode", "cosmap")
WEIGHTINGS = ("uniform", "sigma_sqrt", "cosmap")
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


def _bcast(a: Array, x: Array) -> Array:
  a = jnp.asarray(a, x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ValueError(f"Unknown flow {name} {value!r}; expected one of {', '.join(valid)}")


# ---- time shift -------------------------------------------------------------------------


def shift_time(t: Array, shift: float) -> Array:
  """SD3's resolution shift t' = s t / (1 + (s - 1) t): s > 1 spends more time at high noise.

  Equal to Flux's exponential shift exp(mu) / (exp(mu) + (1 / t - 1)) with mu = log(s).
  """
  return shift * t / (1.0 + (shift - 1.0) * t)


def dynamic_shift(
  num_tokens: int,
  base_shift: float = 0.5,
  max_shift: float = 1.15,
  base_seq_len: int = 256,
  max_seq_len: int = 4096,
) -> float:
  """Flux's shift for an image of `num_tokens` patches: exp(mu), mu linear in the token count.

  mu = base_shift at base_seq_len tokens and max_shift at max_seq_len (extrapolated beyond).
  """
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  mu = base_shift + m * (num_tokens - base_seq_len)
  return math.exp(mu)


# ---- the flow -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flow:
  """A flow-matching process; frozen and hashable, so it can be a static jit argument.

  interpolant, target: see the module docstring. shift: the time shift applied to sampled
  training times and to sampling grids (1 = none). time_scale, reverse_time: the model's time
  input (`model_time`). eps: times are kept in [eps, 1 - eps] where an interpolant or a
  target is singular at the ends (vp; noise and x0 targets, as SiT's train/sample eps).
  """

  interpolant: str = "linear"
  target: str = "velocity"
  shift: float = 1.0
  time_scale: float = 1000.0
  reverse_time: bool = False
  eps: float = 1e-3

  def __post_init__(self):
    _check("interpolant", self.interpolant, INTERPOLANTS)
    _check("target", self.target, TARGETS)
    if not (math.isfinite(self.shift) and self.shift > 0):
      raise ValueError(f"flow shift must be a finite number > 0, got {self.shift!r}")
    if not 0 <= self.eps < 0.5:
      raise ValueError(f"flow eps must be in [0, 0.5), got {self.eps!r}")

  # -- coefficients (t: array of times in [0, 1])
  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    """(alpha(t), sigma(t)), each shaped like t."""
    t = jnp.asarray(t, jnp.float32)
    if self.interpolant == "linear":
      return 1.0 - t, t
    if self.interpolant == "gvp":
      return jnp.cos(0.5 * jnp.pi * t), jnp.sin(0.5 * jnp.pi * t)
    a = jnp.exp(-0.25 * t**2 * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * t * VP_BETA_MIN)
    return a, jnp.sqrt(1.0 - a**2)

  def derivatives(self, t: Array) -> tuple[Array, Array]:
    """(alpha'(t), sigma'(t)), each shaped like t."""
    t = jnp.asarray(t, jnp.float32)
    if self.interpolant == "linear":
      return -jnp.ones_like(t), jnp.ones_like(t)
    if self.interpolant == "gvp":
      h = 0.5 * jnp.pi
      return -h * jnp.sin(h * t), h * jnp.cos(h * t)
    a, s = self.alpha_sigma(t)
    da = -a * (0.5 * t * (VP_BETA_MAX - VP_BETA_MIN) + 0.5 * VP_BETA_MIN)
    return da, -a * da / s

  @property
  def t_range(self) -> tuple[float, float]:
    """(t_min, t_max): the times training draws and sampling starts from."""
    lo = self.eps if self.interpolant == "vp" else 0.0
    hi = 1.0 - self.eps if self.interpolant == "vp" or self.target != "velocity" else 1.0
    return lo, hi

  def model_time(self, t: Array) -> Array:
    """The model's time input for flow times t."""
    return (1.0 - t if self.reverse_time else t) * self.time_scale

  def k_sigma(self, model_t: Array) -> Array:
    """sigma / alpha at model times: the noise level in EDM's units (guidance intervals)."""
    tau = model_t / self.time_scale
    a, s = self.alpha_sigma(1.0 - tau if self.reverse_time else tau)
    return s / jnp.maximum(a, 1e-12)

  def model_output_sign(self) -> float:
    """-1 when the model's velocity is measured in reversed time (SiT), else 1."""
    return -1.0 if self.reverse_time and self.target == "velocity" else 1.0

  # -- conversions
  def to_x0_eps(self, output: Array, x_t: Array, t: Array) -> tuple[Array, Array]:
    """(x0, eps) implied by a model output of type `self.target` at (x_t, t); t (B,) or ()."""
    a, s = (_bcast(c, x_t) for c in self.alpha_sigma(t))
    if self.target == "noise":
      return (x_t - s * output) / a, output
    if self.target == "x0":
      return output, (x_t - a * output) / s
    da, ds = (_bcast(c, x_t) for c in self.derivatives(t))
    det = a * ds - s * da  # 1 for linear: x0 = x - t u, eps = x + (1 - t) u.
    return (ds * x_t - s * output) / det, (a * output - da * x_t) / det

  def velocity(self, x0: Array, eps: Array, t: Array) -> Array:
    da, ds = (_bcast(c, x0) for c in self.derivatives(t))
    return da * x0 + ds * eps

  def target_of(self, x0: Array, eps: Array, t: Array) -> Array:
    """The regression target of type `self.target` for x_t = alpha x0 + sigma eps."""
    if self.target == "noise":
      return eps
    if self.target == "x0":
      return x0
    return self.velocity(x0, eps, t)

  def interpolate(self, x0: Array, eps: Array, t: Array) -> Array:
    a, s = (_bcast(c, x0) for c in self.alpha_sigma(t))
    return a * x0 + s * eps


FLOW_FIELDS = {
  "interpolant": "linear",
  "target": "velocity",
  "shift": 1.0,
  "dynamic_shift": False,
  "time_scale": 1000.0,
  "reverse_time": False,
  "eps": 1e-3,
  "time_sampler": "logit_normal",
  "logit_mean": 0.0,
  "logit_std": 1.0,
  "mode_scale": 1.29,
  "weighting": "uniform",
}


def num_tokens(model_config: Any) -> int:
  """Patches per image of a DiT config (input_size / patch_size)^2."""
  return (model_config.input_size // model_config.patch_size) ** 2


def fields(flow_config: Any) -> dict[str, Any]:
  """Every FLOW_FIELDS key of config.flow (absent ones at their defaults), checked: an
  unknown key or value is a ValueError naming the valid ones."""
  unknown = sorted(set(flow_config) - set(FLOW_FIELDS))
  if unknown:
    raise ValueError(f"Unknown config.flow keys {unknown}; valid keys: {', '.join(FLOW_FIELDS)}")
  f = {k: flow_config.get(k, v) for k, v in FLOW_FIELDS.items()}
  _check("time_sampler", f["time_sampler"], TIME_SAMPLERS)
  _check("weighting", f["weighting"], WEIGHTINGS)
  return f


def check_config(flow_config: Any) -> None:
  """Raises ValueError for an unknown key or value of config.flow, naming the valid ones."""
  fields(flow_config)


def from_config(config: Any) -> Flow:
  """The `Flow` of config.flow; dynamic_shift resolves Flux's shift from config.model's tokens."""
  f = fields(config.flow)
  shift = dynamic_shift(num_tokens(config.model)) if f["dynamic_shift"] else float(f["shift"])
  return Flow(
    interpolant=f["interpolant"],
    target=f["target"],
    shift=shift,
    time_scale=float(f["time_scale"]),
    reverse_time=bool(f["reverse_time"]),
    eps=float(f["eps"]),
  )


def is_flow(config: Any) -> bool:
  """Whether `config` describes a flow-matching model (a `flow` section) or a diffusion one."""
  return "flow" in config


# ---- training times and weights ---------------------------------------------------------------


def sample_time(
  key: Array,
  shape: tuple[int, ...],
  sampler: str = "logit_normal",
  *,
  logit_mean: float = 0.0,
  logit_std: float = 1.0,
  mode_scale: float = 1.29,
) -> Array:
  """Training times in (0, 1) before the shift (SD3, sec. 3.1).

  uniform; logit_normal: sigmoid(N(mean, std)); mode: 1 - u - s (cos^2(pi u / 2) - 1 + u),
  heavier tails than logit-normal; cosmap: 1 - 1 / (tan(pi u / 2) + 1).
  """
  _check("time_sampler", sampler, TIME_SAMPLERS)
  if sampler == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, shape))
  u = jax.random.uniform(key, shape)
  if sampler == "uniform":
    return u
  if sampler == "mode":
    return 1.0 - u - mode_scale * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)
  return 1.0 - 1.0 / (jnp.tan(0.5 * jnp.pi * u) + 1.0)


def loss_weight(t: Array, weighting: str) -> Array:
  """Per-example loss weights at times t (diffusers' compute_loss_weighting_for_sd3).

  uniform: 1; sigma_sqrt: sigma^-2 = t^-2; cosmap: 2 / (pi (1 - 2 t + 2 t^2)), the density of
  cosmap times, so uniform times with cosmap weights give cosmap's expected loss.
  """
  _check("weighting", weighting, WEIGHTINGS)
  if weighting == "sigma_sqrt":
    return 1.0 / jnp.maximum(t, 1e-4) ** 2
  if weighting == "cosmap":
    return 2.0 / (jnp.pi * (1.0 - 2.0 * t + 2.0 * t**2))
  return jnp.ones_like(t)


def flow_loss(
  model_fn: Callable[[Array, Array], Array],
  flow: Flow,
  x0: Array,
  t: Array,
  noise: Array,
  *,
  weighting: str = "uniform",
) -> tuple[Array, dict[str, Array]]:
  """Per-example flow-matching loss (B,) and aux {"mse", "weight", "t"}.

  model_fn: (x_t (B, ...), model time (B,)) -> output like x0. t (B,): flow times (already
  shifted). noise: like x0. The loss is weight(t) * mean((output - target)^2).
  """
  x_t = flow.interpolate(x0, noise, t)
  out = model_fn(x_t, flow.model_time(t))
  if out.shape != x0.shape:
    raise ValueError(f"model output shape {out.shape} != data shape {x0.shape} (learn_sigma?)")
  tgt = flow.model_output_sign() * flow.target_of(x0, noise, t)
  mse = jnp.mean((out - tgt) ** 2, axis=tuple(range(1, x0.ndim)))
  weight = loss_weight(t, weighting)
  return weight * mse, {"mse": mse, "weight": weight, "t": t}


# ---- the analytic case: Gaussian data --------------------------------------------------------


def gaussian_x0_eps(flow: Flow, x: Array, t: Array, mu: float, var: float):
  """Exact E[x0 | x_t] and E[eps | x_t] for data N(mu, var I), t (B,) flow times."""
  a, s = (_bcast(c, x) for c in flow.alpha_sigma(t))
  r = (x - a * mu) / (a**2 * var + s**2)
  return mu + a * var * r, s * r


def gaussian_model(flow: Flow, mu: float, var: float):
  """model(x, model_time) -> the exact output of type flow.target for data N(mu, var I)."""

  def model(x, model_time):
    tau = model_time / flow.time_scale
    t = 1.0 - tau if flow.reverse_time else tau
    x0, eps = gaussian_x0_eps(flow, x, t, mu, var)
    return flow.model_output_sign() * flow.target_of(x0, eps, t)

  return model


def gaussian_ode_solution(flow: Flow, x_1, t_start: float, mu: float, var: float):
  """The probability-flow ODE map from x at time t_start to t = 0 for data N(mu, var I).

  Every interpolant's flow is affine per coordinate: x_0 = mu + sqrt(var) (x - a mu) /
  sqrt(a^2 var + s^2) with (a, s) at t_start. Returns float64 numpy.
  """
  a, s = (float(c) for c in flow.alpha_sigma(jnp.float32(t_start)))
  x = np.asarray(x_1, np.float64)
  return mu + np.sqrt(var) * (x - a * mu) / np.sqrt(a**2 * var + s**2)
