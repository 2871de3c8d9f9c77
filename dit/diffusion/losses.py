"""Training losses: eps / v / x0 regression, min-SNR weighting, and the hybrid VLB loss.

`diffusion_loss` samples t ~ U{0..T-1} and noise, forms x_t, calls the model, and returns a
per-example loss (B,). With `learn_sigma` the model output has 2C channels: the first C are
the prediction, the last C the variance interpolation v in [-1, 1] (improved DDPM), trained
by the variational bound with the mean's gradient stopped (Nichol & Dhariwal 2021, as DiT).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dit.diffusion import schedules
from dit.diffusion.schedules import Schedule

WEIGHTINGS = ("uniform", "min_snr")


def _mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
  return 0.5 * (
    -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
  )


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> jax.Array:
  """Elementwise log p(x) in nats for x in [-1, 1] quantised to 256 levels (bin width 2/255).

  The edge bins extend to -inf / +inf (Ho et al. 2020, eq. 13). Uses the exact normal CDF.
  """
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (centered + 1.0 / 255.0)
  lower = inv_std * (centered - 1.0 / 255.0)
  log_cdf_upper = jax.scipy.special.log_ndtr(upper)
  log_sf_lower = jax.scipy.special.log_ndtr(-lower)
  delta = jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower)
  log_delta = jnp.log(jnp.maximum(delta, 1e-12))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_delta))


def vlb_terms(
  schedule: Schedule,
  x0: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  pred_x0: jax.Array,
  var_interp: jax.Array,
) -> jax.Array:
  """Per-example variational-bound term L_t in bits/dim (B,).

  p(x_{t-1}|x_t) has the posterior mean at pred_x0 and log variance
  frac * log(beta_t) + (1 - frac) * log(posterior_variance_t), frac = (v + 1) / 2.
  For t > 0 it is KL(q(x_{t-1}|x_t, x0) || p); for t = 0 the discretised decoder NLL.
  """
  b = lambda a: schedules._bcast(a[t], x0)
  coef1, coef2 = b(schedule.posterior_mean_coef1), b(schedule.posterior_mean_coef2)
  true_mean = coef1 * x0 + coef2 * x_t
  true_logvar = b(schedule.posterior_log_variance_clipped)
  model_mean = coef1 * pred_x0 + coef2 * x_t
  frac = (var_interp + 1.0) / 2.0
  model_logvar = frac * b(jnp.log(schedule.betas)) + (1.0 - frac) * true_logvar
  kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
  nll = -_mean_flat(
    discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
  ) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def diffusion_loss(
  model_fn: Callable[[jax.Array, jax.Array], jax.Array],
  x0: jax.Array,
  key: jax.Array,
  schedule: Schedule,
  *,
  prediction: str = "eps",
  weighting: str = "uniform",
  min_snr_gamma: float = 5.0,
  learn_sigma: bool = False,
  t: jax.Array | None = None,
  noise: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example diffusion loss.

  Args:
    model_fn: (x_t (B, ...), t (B,) int32) -> output (B, ..., C) or (B, ..., 2C) if learn_sigma.
    x0: clean data (B, ..., C).
    key: PRNG key for t and the noise.
    schedule: the training schedule (T = schedule.T).
    prediction: what the model predicts: "eps", "v" or "x0".
    weighting: "uniform" (plain MSE of the prediction) or "min_snr": Hang et al. 2023,
      weights equivalent to min(SNR, gamma) times the x0-MSE, whatever the prediction type.
    min_snr_gamma: gamma for "min_snr".
    learn_sigma: add the VLB term (bits/dim) that trains the variance channels.
    t, noise: optional fixed timesteps (B,) and noise (like x0), for tests.
  Returns:
    loss (B,), and aux: {"mse", "vb", "weight", "t"} each (B,).
  """
  schedules.check_prediction(prediction)
  if weighting not in WEIGHTINGS:
    raise ValueError(f"Unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
  batch = x0.shape[0]
  k_t, k_noise = jax.random.split(key)
  if t is None:
    t = jax.random.randint(k_t, (batch,), 0, schedule.T, dtype=jnp.int32)
  if noise is None:
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  x_t = schedules.q_sample(schedule, x0, t, noise)
  out = model_fn(x_t, t)
  c = x0.shape[-1]
  if learn_sigma:
    if out.shape[-1] != 2 * c:
      raise ValueError(
        f"learn_sigma=True needs {2 * c} output channels (prediction + variance), "
        f"got output shape {out.shape}"
      )
    pred, var_interp = out[..., :c], out[..., c:]
  else:
    if out.shape != x0.shape:
      raise ValueError(f"model output shape {out.shape} != data shape {x0.shape}")
    pred, var_interp = out, None

  alpha = schedule.sqrt_alphas_cumprod[t]
  sigma = schedule.sqrt_one_minus_alphas_cumprod[t]
  tgt = schedules.target(x0, noise, alpha, sigma, prediction)
  mse = _mean_flat((pred - tgt) ** 2)

  if weighting == "uniform":
    weight = jnp.ones((batch,), jnp.float32)
  else:
    snr = schedules.snr(schedule, t)
    clipped = jnp.minimum(snr, min_snr_gamma)
    # MSE on eps = SNR * MSE on x0, MSE on v = (SNR + 1) * MSE on x0.
    denom = {"eps": snr, "v": snr + 1.0, "x0": jnp.ones_like(snr)}[prediction]
    weight = clipped / denom
  loss = weight * mse

  if learn_sigma:
    # The VLB trains only the variance: the mean comes from a stopped-gradient prediction.
    frozen_x0, _ = schedules.to_x0_eps(jax.lax.stop_gradient(pred), x_t, alpha, sigma, prediction)
    vb = vlb_terms(schedule, x0, x_t, t, frozen_x0, var_interp)
    loss = loss + vb
  else:
    vb = jnp.zeros((batch,), jnp.float32)
  return loss, {"mse": mse, "vb": vb, "weight": weight, "t": t}
