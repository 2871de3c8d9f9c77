"""Classifier-free guidance: formula on all channels, one batched call, interval, rescale,
per-row scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.diffusion import guidance, schedules

B, C = 3, 4


def _model(calls):
  """Cond rows predict x + label, null rows predict x * 0.5 (on all C channels); the
  variance channels say which half they came from."""

  def model_fn(x, t, cond):
    calls.append((x.shape, t.shape, {k: v.shape for k, v in cond.items()}))
    drop = cond["drop"].reshape((-1,) + (1,) * (x.ndim - 1))
    lab = cond["label"].astype(x.dtype).reshape(drop.shape)
    pred = jnp.where(drop, 0.5 * x, x + lab)
    var = jnp.where(drop, -jnp.ones_like(x), jnp.ones_like(x))
    return jnp.concatenate([pred, var], axis=-1)

  return model_fn


def test_cfg_all_channels_one_batched_call():
  calls = []
  x = jax.random.normal(jax.random.key(0), (B, 2, 2, C))
  t = jnp.full((B,), 500.0)
  cond = {"label": jnp.array([1, 2, 3])}
  out = guidance.cfg_denoise(_model(calls), cond, 4.0)(x, t)
  assert len(calls) == 1 and calls[0][0] == (2 * B, 2, 2, C) and calls[0][1] == (2 * B,)
  c, u = x + cond["label"][:, None, None, None], 0.5 * x
  np.testing.assert_allclose(out[..., :C], u + 4.0 * (c - u), rtol=1e-6)  # all 4 channels
  np.testing.assert_allclose(out[..., C:], 1.0)  # variance from the conditional half


def test_scale_one_is_the_conditional_model():
  calls = []
  x = jnp.ones((B, C))
  out = guidance.cfg_denoise(
    _model(calls), {"label": jnp.zeros(B), "drop": jnp.zeros(B, bool)}, 1.0
  )(x, jnp.zeros(B))
  assert calls[0][0] == (B, C)
  np.testing.assert_allclose(out[..., :C], 1.0)


def test_interval_applies_only_inside():
  schedule = schedules.make_schedule()
  sig = np.asarray(schedule.sigmas)
  lo, hi = float(sig[300]), float(sig[700])
  x = jax.random.normal(jax.random.key(1), (B, C))
  t = jnp.array([100.0, 500.0, 900.0])
  cond = {"label": jnp.ones(B)}
  out = guidance.cfg_denoise(_model([]), cond, 3.0, interval=(lo, hi), schedule=schedule)(x, t)
  c, u = x + 1.0, 0.5 * x
  np.testing.assert_allclose(out[0, :C], c[0], rtol=1e-6)
  np.testing.assert_allclose(out[1, :C], u[1] + 3.0 * (c[1] - u[1]), rtol=1e-6)
  np.testing.assert_allclose(out[2, :C], c[2], rtol=1e-6)


def test_interval_bounds_are_inclusive():
  """Guided where sigma_lo <= sigma_t <= sigma_hi: on both bounds exactly; one timestep (or
  half of one) outside either bound gives the conditional output."""
  schedule = schedules.make_schedule()
  sig = np.asarray(schedule.sigmas)
  lo, hi = float(sig[300]), float(sig[700])
  t = jnp.array([299.0, 299.5, 300.0, 500.0, 700.0, 700.5, 701.0])
  inside = np.array([False, False, True, True, True, False, False])
  # sigma_at is exact at integer timesteps, so t = 300 and t = 700 sit on the bounds.
  np.testing.assert_array_equal(np.asarray(guidance.sigma_at(schedule, t))[[2, 4]], [lo, hi])
  x = jax.random.normal(jax.random.key(3), (len(t), C))
  cond = {"label": jnp.ones(len(t))}
  out = guidance.cfg_denoise(_model([]), cond, 3.0, interval=(lo, hi), schedule=schedule)(x, t)
  c, u = x + 1.0, 0.5 * x
  want = np.where(inside[:, None], u + 3.0 * (c - u), c)
  np.testing.assert_allclose(out[:, :C], want, rtol=1e-6)
  # The widest interval, [0, sigma_max], guides every timestep: the plain guided output.
  widest = (0.0, float(sig.max()))
  t_all = jnp.array([0.0, 999.0])
  full = guidance.cfg_denoise(_model([]), {"label": jnp.ones(2)}, 3.0)(x[:2], t_all)
  kw = dict(interval=widest, schedule=schedule)
  both = guidance.cfg_denoise(_model([]), {"label": jnp.ones(2)}, 3.0, **kw)(x[:2], t_all)
  np.testing.assert_array_equal(both, full)


def test_interval_and_rescale_checks_on_their_bounds():
  """check_interval: 0 <= lo < hi, and the interval must meet [sigma_min, sigma_max];
  rescale in [0, 1]. Each bound itself is allowed, the value just past it is not."""
  schedule = schedules.make_schedule()
  sig = np.asarray(schedule.sigmas)
  s_min, s_max = float(sig[0]), float(sig.max())
  ok = [(0.0, 1.0), (0.5 * s_min, s_min), (s_max, 2 * s_max)]
  for interval in ok:  # Touching the range at one end still guides there.
    guidance.cfg_denoise(_model([]), None, 2.0, interval=interval, schedule=schedule)
  bad = {
    (1.0, 1.0): "0 <= lo < hi",
    (-1e-6, 1.0): "0 <= lo < hi",
    (0.5 * s_min, np.nextafter(s_min, 0.0)): "outside the schedule",
    (np.nextafter(s_max, np.inf), 2 * s_max): "outside the schedule",
  }
  for interval, message in bad.items():
    with pytest.raises(ValueError, match=message):
      guidance.cfg_denoise(_model([]), None, 2.0, interval=interval, schedule=schedule)
  for rescale in (0.0, 1.0):
    guidance.cfg_denoise(_model([]), None, 2.0, rescale=rescale)
  for rescale in (-1e-9, 1.0 + 1e-9):
    with pytest.raises(ValueError, match="rescale must be in"):
      guidance.cfg_denoise(_model([]), None, 2.0, rescale=rescale)


def test_rescale():
  x = jax.random.normal(jax.random.key(2), (B, 8, C))
  t = jnp.full((B,), 10.0)
  cond = {"label": jnp.ones(B)}
  full = guidance.cfg_denoise(_model([]), cond, 5.0, rescale=1.0)(x, t)[..., :C]
  std_c = jnp.std(x + 1.0, axis=(1, 2))
  np.testing.assert_allclose(jnp.std(full, axis=(1, 2)), std_c, rtol=1e-5)
  plain = guidance.cfg_denoise(_model([]), cond, 5.0)(x, t)[..., :C]
  half = guidance.cfg_denoise(_model([]), cond, 5.0, rescale=0.5)(x, t)[..., :C]
  np.testing.assert_allclose(half, 0.5 * full + 0.5 * plain, rtol=1e-5, atol=1e-6)


def test_bad_interval():
  schedule = schedules.make_schedule()
  with pytest.raises(ValueError, match="0 <= lo < hi"):
    guidance.cfg_denoise(_model([]), None, 2.0, interval=(5.0, 1.0), schedule=schedule)
  with pytest.raises(ValueError, match="outside the schedule"):
    guidance.cfg_denoise(_model([]), None, 2.0, interval=(500.0, 900.0), schedule=schedule)
  with pytest.raises(ValueError, match="needs the schedule"):
    guidance.cfg_denoise(_model([]), None, 2.0, interval=(0.1, 1.0))
  with pytest.raises(ValueError, match="rescale"):
    guidance.cfg_denoise(_model([]), None, 2.0, rescale=2.0)


def test_guidance_with_one_scale_per_row():
  """cfg_denoise with scales (B,) equals row-by-row guidance with each scalar."""

  def model_fn(x, t, c):
    drop = c.get("drop", jnp.zeros(x.shape[0], bool))
    scale = jnp.where(drop, 1.0, 2.0) + t * jnp.where(drop, 0, c["label"])
    return x * scale[:, None, None, None]

  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  t = jnp.asarray([1.0, 2.0, 3.0])
  cond = {"label": jnp.asarray([1, 2, 3])}
  w = jnp.asarray([1.0, 2.5, 4.0])
  out = guidance.cfg_denoise(model_fn, cond, w)(x, t)
  for i in range(3):
    row = guidance.cfg_denoise(model_fn, {"label": cond["label"][i : i + 1]}, float(w[i]) + 0.0)
    np.testing.assert_allclose(out[i : i + 1], row(x[i : i + 1], t[i : i + 1]), rtol=1e-6)
  with pytest.raises(ValueError, match="guidance scale must be a number or"):
    guidance.cfg_denoise(model_fn, cond, jnp.ones((3, 1)))


def test_guidance_rescale_of_a_constant_output_is_finite():
  model_fn = lambda x, t, c: jnp.ones_like(x)
  cond = {"label": jnp.asarray([1, 2])}
  out = guidance.cfg_denoise(model_fn, cond, 4.0, rescale=0.7)(jnp.zeros((2, 2, 2, 1)), jnp.ones(2))
  np.testing.assert_array_equal(out, 1.0)
