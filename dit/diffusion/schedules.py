"""Discrete noise schedules, forward noising, and prediction-type conversions.

Notation (variance preserving, as in DDPM/DiT):
  x_t = alpha_t * x0 + sigma_t * eps,   alpha_t = sqrt(alphas_cumprod[t]),
  sigma_t = sqrt(1 - alphas_cumprod[t]),  t an integer timestep in [0, T).
The "k-diffusion" (variance exploding) noise level is k_t = sigma_t / alpha_t, and
x_ve = x_t / alpha_t = x0 + k_t * eps. The log-SNR is lambda_t = log(alpha_t / sigma_t).

Prediction types: "eps" (the noise), "v" (v = alpha_t * eps - sigma_t * x0, Salimans & Ho
2022) and "x0" (the clean sample). `to_x0_eps` and `target` convert exactly between them.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
PREDICTIONS = ("eps", "v", "x0")


@flax.struct.dataclass
class Schedule:
  """A discrete diffusion schedule; every field is a float32 array of shape (T,)."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array  # alphas_cumprod[t - 1], with 1.0 at t = 0.
  sqrt_alphas_cumprod: jax.Array  # alpha_t
  sqrt_one_minus_alphas_cumprod: jax.Array  # sigma_t
  sigmas: jax.Array  # k_t = sigma_t / alpha_t (variance-exploding noise level)
  # Posterior q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, posterior_variance).
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array  # log variance with t=0 replaced by t=1.
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    """T, the number of training timesteps (static: it is a shape)."""
    return self.betas.shape[0]

  @property
  def T(self) -> int:  # noqa: N802 - the standard name.
    return self.betas.shape[0]


def beta_schedule(
  kind: str = "linear",
  num_timesteps: int = 1000,
  beta_start: float = 1e-4,
  beta_end: float = 0.02,
  *,
  cosine_s: float = 0.008,
  max_beta: float = 0.999,
) -> np.ndarray:
  """Betas (T,) float64 for a named schedule.

  linear: evenly spaced betas (DiT/ADM: 1e-4..0.02; rescale by 1000/T yourself for other T).
  scaled_linear: evenly spaced sqrt(beta) (Stable Diffusion / PixArt: 0.00085..0.012).
  cosine: Nichol & Dhariwal 2021, alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2),
    betas clipped at max_beta (diffusers "squaredcos_cap_v2").
  sigmoid: beta_start + (beta_end - beta_start) * sigmoid(linspace(-6, 6, T)) (GeoDiff).
  """
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
  n = num_timesteps
  if kind == "linear":
    betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
  elif kind == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  elif kind == "cosine":

    def alpha_bar(u):
      return math.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2

    betas = np.array(
      [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    )
  elif kind == "sigmoid":
    z = np.linspace(-6, 6, n, dtype=np.float64)
    betas = 1 / (1 + np.exp(-z)) * (beta_end - beta_start) + beta_start
  else:
    raise ValueError(f"Unknown beta schedule {kind!r}; expected one of {BETA_SCHEDULES}")
  return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Shift and scale sqrt(alphas_cumprod) so that the last one is exactly 0 (Lin et al. 2024).

  Keeps alpha_0 unchanged; sigma_{T-1} becomes 1, i.e. the terminal SNR is 0. Samplers must
  then start from a trailing timestep grid and a v- or x0-predicting model.
  """
  sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * first / (first - last)
  ab = sqrt_ab**2
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return 1.0 - alphas


def schedule_from_betas(betas) -> Schedule:
  """Builds a `Schedule` from betas (T,); all derived arrays are computed in float64."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
  if np.any(betas <= 0) or np.any(betas > 1):
    raise ValueError("betas must lie in (0, 1]")
  return _schedule(betas, np.cumprod(1.0 - betas))


def schedule_from_alphas_cumprod(alphas_cumprod) -> Schedule:
  """Builds a `Schedule` from given alphas_cumprod (T,), kept exactly (up to float32).

  For a reference's own table, e.g. diffusers' float32 torch.cumprod of its betas, which
  `schedule_from_betas` (float64 accumulation) reproduces only to ~1e-6 relative. betas are
  recovered as 1 - alphas_cumprod[t] / alphas_cumprod[t - 1]; the table must be strictly
  decreasing in (0, 1], with a last entry of 0 allowed (zero terminal SNR).
  """
  ab = np.asarray(alphas_cumprod, np.float64)
  if ab.ndim != 1 or ab.shape[0] < 1:
    raise ValueError(f"alphas_cumprod must be a non-empty 1-D array, got shape {ab.shape}")
  if not (np.all(ab[:-1] > 0) and ab[-1] >= 0 and ab[0] <= 1 and np.all(np.diff(ab) < 0)):
    raise ValueError("alphas_cumprod must be strictly decreasing in (0, 1] (the last may be 0)")
  betas = 1.0 - ab / np.concatenate([[1.0], ab[:-1]])
  if betas[0] <= 0:
    raise ValueError("alphas_cumprod[0] must be < 1 (betas[0] > 0)")
  return _schedule(betas, ab)


def _schedule(betas: np.ndarray, ab: np.ndarray) -> Schedule:
  """The `Schedule` of float64 betas (T,) and their alphas_cumprod (T,)."""
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  with np.errstate(divide="ignore", invalid="ignore"):
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    sigmas = np.sqrt((1.0 - ab) / ab)
  # log(0) at t=0: like improved DDPM, use the t=1 value there (only used for t=0 of the VLB).
  post_log_var = (
    np.log(np.concatenate([post_var[1:2], post_var[1:]])) if len(betas) > 1 else (np.log(betas))
  )
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
    betas=f32(betas),
    alphas_cumprod=f32(ab),
    alphas_cumprod_prev=f32(ab_prev),
    sqrt_alphas_cumprod=f32(np.sqrt(ab)),
    sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
    sigmas=f32(sigmas),
    posterior_variance=f32(post_var),
    posterior_log_variance_clipped=f32(post_log_var),
    posterior_mean_coef1=f32(betas * np.sqrt(ab_prev) / (1.0 - ab)),
    posterior_mean_coef2=f32((1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab)),
  )


def make_schedule(
  kind: str = "linear",
  num_timesteps: int = 1000,
  beta_start: float = 1e-4,
  beta_end: float = 0.02,
  zero_terminal_snr: bool = False,
  *,
  cosine_s: float = 0.008,
  max_beta: float = 0.999,
) -> Schedule:
  """The schedule used for training and sampling (see `beta_schedule` for the kinds)."""
  betas = beta_schedule(
    kind, num_timesteps, beta_start, beta_end, cosine_s=cosine_s, max_beta=max_beta
  )
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  return schedule_from_betas(betas)


# config.diffusion fields that shape the schedule, with the defaults of `make_schedule`.
SCHEDULE_FIELDS = {
  "schedule": "linear",
  "num_timesteps": 1000,
  "beta_start": 1e-4,
  "beta_end": 0.02,
  "zero_terminal_snr": False,
  "cosine_s": 0.008,
  "max_beta": 0.999,
}


def from_config(diffusion_config) -> Schedule:
  """The schedule of `config.diffusion` (a ConfigDict or dict); absent fields take defaults.

  Every option of `make_schedule` is reachable: schedule (the kind), num_timesteps,
  beta_start, beta_end, zero_terminal_snr, cosine_s, max_beta.
  """
  d = {k: diffusion_config.get(k, v) for k, v in SCHEDULE_FIELDS.items()}
  return make_schedule(
    d["schedule"],
    d["num_timesteps"],
    beta_start=d["beta_start"],
    beta_end=d["beta_end"],
    zero_terminal_snr=d["zero_terminal_snr"],
    cosine_s=d["cosine_s"],
    max_beta=d["max_beta"],
  )


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes per-example values (B,) (or a scalar) to broadcast against x (B, ...)."""
  a = jnp.asarray(a, x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Forward noising x_t = alpha_t x0 + sigma_t noise; x0, noise (B, ...), t (B,) int."""
  a = _bcast(schedule.sqrt_alphas_cumprod[t], x0)
  s = _bcast(schedule.sqrt_one_minus_alphas_cumprod[t], x0)
  return a * x0 + s * noise


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio alpha_t^2 / sigma_t^2 at integer timesteps t."""
  ab = schedule.alphas_cumprod[t]
  return ab / (1.0 - ab)


def check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"Unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


def to_x0_eps(
  output: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, prediction: str
) -> tuple[jax.Array, jax.Array]:
  """(x0, eps) implied by a model output of type `prediction` at x_t = alpha x0 + sigma eps.

  alpha and sigma are scalars or (B,) arrays; eps from an x0 output needs sigma > 0 and x0
  from an eps output needs alpha > 0 (zero terminal SNR models should predict v).
  """
  check_prediction(prediction)
  a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
  if prediction == "eps":
    eps = output
    x0 = (x_t - s * eps) / a
  elif prediction == "v":
    # With a^2 + s^2 = 1: x0 = a x_t - s v and eps = s x_t + a v.
    x0 = a * x_t - s * output
    eps = s * x_t + a * output
  else:
    x0 = output
    eps = (x_t - a * x0) / s
  return x0, eps


def target(
  x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array, prediction: str
) -> jax.Array:
  """The regression target of type `prediction` for x_t = alpha x0 + sigma eps."""
  check_prediction(prediction)
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  return _bcast(alpha, x0) * eps - _bcast(sigma, x0) * x0


def convert(
  output: jax.Array,
  x_t: jax.Array,
  alpha: jax.Array,
  sigma: jax.Array,
  *,
  source: str,
  dest: str,
) -> jax.Array:
  """Converts a model output from prediction type `source` to `dest` (exactly)."""
  x0, eps = to_x0_eps(output, x_t, alpha, sigma, source)
  return target(x0, eps, alpha, sigma, dest)


def karras_sigmas(sigma_min, sigma_max, n: int, rho: float = 7.0) -> jax.Array:
  """Karras et al. (2022) noise levels (n,), decreasing from sigma_max to sigma_min."""
  ramp = jnp.linspace(0.0, 1.0, n)
  lo, hi = jnp.asarray(sigma_min) ** (1 / rho), jnp.asarray(sigma_max) ** (1 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def spaced_timesteps(
  num_timesteps: int,
  steps: int,
  spacing: str = "trailing",
  offset: int = 0,
  *,
  multistep: bool = False,
  fractional: bool = False,
) -> np.ndarray:
  """Sampling timesteps (steps,), strictly decreasing, as diffusers' `timestep_spacing`.

  With T = num_timesteps and n = steps, each diffusers scheduler's own formula:
  leading:  i * (T // n) + offset for i < n, reversed (DDIM paper; never reaches T - 1).
  trailing: round(T - i T / n) - 1 for i < n: starts at T - 1 (Lin et al. 2024); no offset.
  linspace: round(linspace(0, T - 1, n)) reversed: both ends included; no offset.
  multistep (DPMSolverMultistep, UniPC): leading and linspace space n + 1 points (leading
    with step T // (n + 1)) and drop the last one, so the grid never includes t = 0.
  fractional (Euler, Euler ancestral, Heun): linspace keeps np.linspace's fractional
    values; the result is float32 (as diffusers'), otherwise int64.
  """
  T, n = num_timesteps, steps
  if not 1 <= n <= T:
    raise ValueError(f"steps must be in [1, T={T}], got {n}")
  m = n + 1 if multistep else n  # points before the multistep rule drops the last one
  if spacing == "leading":
    ts = (np.arange(m) * (T // m)).round()[::-1][:n] + offset
  elif spacing == "trailing":
    ts = np.round(np.arange(T, 0, -T / n)) - 1
  elif spacing == "linspace":
    ts = np.linspace(0, T - 1, m)[::-1][:n]
    ts = ts.astype(np.float32) if fractional else ts.round()
  else:
    raise ValueError(
      f"Unknown timestep spacing {spacing!r}; expected 'leading', 'trailing' or 'linspace'"
    )
  ts = np.asarray(ts[:n], np.float32 if fractional else np.int64)
  if ts.max() >= T or ts.min() < 0:
    raise ValueError(
      f"{spacing} timesteps for steps={n} reach {ts.max()}, outside [0, {T}) (offset={offset})"
    )
  if np.any(np.diff(ts) >= 0):
    raise ValueError(
      f"timestep_spacing {spacing!r} repeats timesteps at steps={n} for T={T} "
      f"({'multistep' if multistep else 'single-step'} rule); use fewer steps or 'trailing'"
    )
  return ts


def sigma_to_t(schedule: Schedule, sigma: jax.Array) -> jax.Array:
  """Fractional timestep whose k-sigma is `sigma`, interpolating linearly in log sigma."""
  log_sigmas = jnp.log(schedule.sigmas)
  return jnp.interp(
    jnp.log(jnp.maximum(sigma, 1e-10)), log_sigmas, jnp.arange(schedule.T, dtype=jnp.float32)
  )


# ---- The analytic case: Gaussian data -----------------------------------------------------
# For x0 ~ N(mu, var I) the score is closed-form, so samplers and distillation can be checked
# against exact answers instead of a trained model.


def gaussian_eps_predictor(schedule: Schedule, mu: float, var: float):
  """denoise(x, t): the exact E[eps | x_t] for data N(mu, var I), t (B,) fractional timesteps.

  x is VP-scaled (x_t = alpha_t x0 + sigma_t eps); k-sigma is interpolated in log space.
  """
  log_k = jnp.log(schedule.sigmas)

  def denoise(x, t):
    k = jnp.exp(jnp.interp(t, jnp.arange(schedule.T, dtype=jnp.float32), log_k))
    a = (1.0 / jnp.sqrt(1.0 + k**2)).reshape((-1,) + (1,) * (x.ndim - 1))
    s = a * k.reshape(a.shape)
    return s * (x - a * mu) / (a**2 * var + s**2)

  return denoise


def gaussian_ode_solution(schedule: Schedule, x_T, mu: float, var: float):
  """The probability-flow ODE map from x at t = T - 1 to t = 0 for data N(mu, var I).

  x_T is VP-scaled at t = T - 1; the map is affine, and the answer lies in float64 numpy.
  """
  ab = float(schedule.alphas_cumprod[-1])
  x_T = np.asarray(x_T, np.float64)
  return mu + np.sqrt(var) * (x_T - np.sqrt(ab) * mu) / np.sqrt(ab * var + 1 - ab)
