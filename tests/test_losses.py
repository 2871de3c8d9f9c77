"""Losses: closed forms for the MSE targets, min-SNR weights, and the VLB term."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dit.diffusion import losses, schedules

S = schedules.make_schedule()
B = 6
X0 = jnp.clip(0.5 * jax.random.normal(jax.random.key(0), (B, 4, 4, 2)), -1, 1)
NOISE = jax.random.normal(jax.random.key(1), X0.shape)
T = jnp.array([0, 1, 10, 250, 700, 999])
A = S.sqrt_alphas_cumprod[T][:, None, None, None]
SG = S.sqrt_one_minus_alphas_cumprod[T][:, None, None, None]


def loss(model_fn, **kw):
  return losses.diffusion_loss(model_fn, X0, jax.random.key(2), S, t=T, noise=NOISE, **kw)


@pytest.mark.parametrize(
  "prediction,target",
  [("eps", NOISE), ("x0", X0), ("v", A * NOISE - SG * X0)],
)
def test_mse_targets(prediction, target):
  perfect, aux = loss(lambda x_t, t: target, prediction=prediction)
  np.testing.assert_allclose(perfect, 0.0, atol=1e-10)
  zero, aux = loss(lambda x_t, t: jnp.zeros_like(x_t), prediction=prediction)
  np.testing.assert_allclose(zero, jnp.mean(target**2, axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_array_equal(aux["t"], T)


def test_model_sees_q_sample():
  seen = {}

  def model_fn(x_t, t):
    seen["x_t"], seen["t"] = x_t, t
    return jnp.zeros_like(x_t)

  loss(model_fn)
  np.testing.assert_allclose(seen["x_t"], A * X0 + SG * NOISE, rtol=1e-6)


def test_uniform_timesteps():
  x0 = jnp.zeros((20000, 1))
  _, aux = losses.diffusion_loss(lambda x, t: x, x0, jax.random.key(3), S)
  t = np.asarray(aux["t"])
  assert t.min() == 0 and t.max() == 999 and abs(t.mean() - 499.5) < 8
  assert aux["t"].dtype == jnp.int32


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weights(prediction):
  _, aux = loss(lambda x, t: jnp.zeros_like(x), prediction=prediction, weighting="min_snr")
  ab = np.asarray(S.alphas_cumprod[T], np.float64)
  snr = ab / (1 - ab)
  expected = {"eps": np.minimum(snr, 5) / snr, "v": np.minimum(snr, 5) / (snr + 1)}.get(
    prediction, np.minimum(snr, 5)
  )
  np.testing.assert_allclose(aux["weight"], expected, rtol=1e-4)


def _reference_vb(x0, x_t, t, pred_x0, v):
  """Independent float64 NumPy/SciPy version of the improved-DDPM L_t (bits/dim)."""
  x0, x_t, pred_x0, v = (np.asarray(a, np.float64) for a in (x0, x_t, pred_x0, v))
  betas = np.linspace(1e-4, 0.02, 1000)
  ab = np.cumprod(1 - betas)
  out = []
  for i, ti in enumerate(np.asarray(t)):
    ab_prev = ab[ti - 1] if ti > 0 else 1.0
    c1 = betas[ti] * np.sqrt(ab_prev) / (1 - ab[ti])
    c2 = (1 - ab_prev) * np.sqrt(1 - betas[ti]) / (1 - ab[ti])
    post_var = lambda k: betas[k] * (1 - ab[k - 1]) / (1 - ab[k])
    logvar = np.log(post_var(max(ti, 1)))
    frac = (v[i] + 1) / 2
    mlogvar = frac * np.log(betas[ti]) + (1 - frac) * logvar
    mean_q, mean_p = c1 * x0[i] + c2 * x_t[i], c1 * pred_x0[i] + c2 * x_t[i]
    if ti == 0:
      sd = np.exp(0.5 * mlogvar)
      hi = np.where(x0[i] > 0.999, np.inf, x0[i] + 1 / 255)
      lo = np.where(x0[i] < -0.999, -np.inf, x0[i] - 1 / 255)
      p = stats.norm.cdf(hi, mean_p, sd) - stats.norm.cdf(lo, mean_p, sd)
      out.append(-np.mean(np.log(np.maximum(p, 1e-12))) / math.log(2))
    else:
      kl = 0.5 * (
        -1 + mlogvar - logvar + np.exp(logvar - mlogvar) + (mean_q - mean_p) ** 2 * np.exp(-mlogvar)
      )
      out.append(np.mean(kl) / math.log(2))
  return np.array(out)


def test_vlb_matches_reference_and_is_zero_at_the_truth():
  v = jnp.tanh(jax.random.normal(jax.random.key(4), X0.shape))
  eps_hat = NOISE + 0.3 * jax.random.normal(jax.random.key(5), X0.shape)
  out, aux = loss(lambda x, t: jnp.concatenate([eps_hat, v], -1), learn_sigma=True)
  x_t = A * X0 + SG * NOISE
  pred_x0 = (x_t - SG * eps_hat) / A
  np.testing.assert_allclose(aux["vb"], _reference_vb(X0, x_t, T, pred_x0, v), rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(out, aux["mse"] + aux["vb"], rtol=1e-6)
  # Exact mean and the posterior variance (v = -1): L_t = 0 for t > 0.
  _, aux = loss(lambda x, t: jnp.concatenate([NOISE, -jnp.ones_like(x)], -1), learn_sigma=True)
  np.testing.assert_allclose(aux["vb"][1:], 0.0, atol=1e-5)


def test_vlb_trains_only_the_variance():
  def total(eps_and_v):
    return loss(lambda x, t: eps_and_v, learn_sigma=True)[1]["vb"].sum()

  out = jnp.concatenate([NOISE + 0.1, 0.2 * jnp.ones_like(X0)], -1)
  g = jax.grad(total)(out)
  assert float(jnp.abs(g[..., :2]).max()) == 0.0 and float(jnp.abs(g[..., 2:]).max()) > 0


def test_bad_input():
  f = lambda x, t: x
  with pytest.raises(ValueError, match="prediction type"):
    loss(f, prediction="score")
  with pytest.raises(ValueError, match="weighting"):
    loss(f, weighting="p2")
  with pytest.raises(ValueError, match="needs 4 output channels"):
    loss(f, learn_sigma=True)
  with pytest.raises(ValueError, match="output shape"):
    loss(lambda x, t: jnp.concatenate([x, x], -1))


def test_discretized_likelihood_edge_bins():
  """Pixels k / 127.5 - 1: the end values -1 and 1 take the open edge bins (-inf, -1 + 1/255]
  and [1 - 1/255, inf) (Ho et al. 2020, eq. 13); every other value its bin of width 2/255,
  the ones next to the ends included (the switch at |x| > 0.999 lies between them)."""
  x = np.array([-1.0, 1 / 127.5 - 1, 0.0, 1 - 1 / 127.5, 1.0], np.float32)
  mean, log_scale = np.float32(0.3), np.float32(np.log(0.4))
  got = np.asarray(losses.discretized_gaussian_log_likelihood(x, mean, log_scale))
  cdf = lambda v: stats.norm.cdf(v, 0.3, 0.4)
  xs = x.astype(np.float64)
  want = np.log(cdf(xs + 1 / 255) - cdf(xs - 1 / 255))
  want[0] = np.log(cdf(-1 + 1 / 255))
  want[-1] = np.log(1 - cdf(1 - 1 / 255))
  np.testing.assert_allclose(got, want, rtol=1e-5)
