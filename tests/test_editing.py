"""img2img and inpainting as sampler options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.diffusion import editing, samplers, schedules

SCHEDULE = schedules.make_schedule()


def denoise(x, t):
  """Exact eps-predictor for data N(0, 0.25 I)."""
  ab = jnp.interp(t, jnp.arange(1000.0), SCHEDULE.alphas_cumprod).reshape(
    (-1,) + (1,) * (x.ndim - 1)
  )
  return jnp.sqrt(1 - ab) * x / (0.25 * ab + 1 - ab)


X_INIT = 0.5 * jax.random.normal(jax.random.key(5), (2, 4, 4, 1))
X_T = jax.random.normal(jax.random.key(6), (2, 4, 4, 1))
MASK = jnp.zeros((2, 4, 4, 1)).at[:, :, :2].set(1.0)  # keep the left half


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_inpainting_keeps_known_region(sampler):
  x = samplers.sample(
    denoise, X_T, jax.random.key(0), SCHEDULE, sampler=sampler, steps=8, x_init=X_INIT, mask=MASK
  )
  np.testing.assert_allclose(x[:, :, :2], X_INIT[:, :, :2], atol=1e-5)
  assert float(jnp.abs(x[:, :, 2:] - X_INIT[:, :, 2:]).mean()) > 0.05  # unknown region resampled


def test_repaint_resampling():
  x, traj = samplers.sample(
    denoise,
    X_T,
    jax.random.key(0),
    SCHEDULE,
    sampler="ddpm",
    steps=6,
    x_init=X_INIT,
    mask=MASK,
    resample=3,
    return_trajectory=True,
  )
  assert traj.shape[0] == 5 * 3 + 1
  np.testing.assert_allclose(x[:, :, :2], X_INIT[:, :, :2], atol=1e-5)


def test_img2img_strength():
  run = lambda s: samplers.sample(
    denoise,
    X_T,
    jax.random.key(0),
    SCHEDULE,
    sampler="ddim",
    steps=10,
    x_init=X_INIT,
    strength=s,
    return_trajectory=True,
  )
  x_lo, traj = run(0.3)
  assert traj.shape[0] == 3  # the last 3 of 10 grid points
  dist = lambda x: float(jnp.abs(x - X_INIT).mean())
  assert dist(x_lo) < 0.8 * dist(run(1.0)[0])  # closer to x_init at low strength
  # Heun keeps the last 3 grid points too: 3 predictor + 2 corrector evaluations.
  plan = samplers.build_plan(SCHEDULE, sampler="heun", steps=10, start=7)
  assert plan.num_steps == 5


def test_img2img_strength_on_its_bounds():
  """strength in (0, 1], kept grid points int(steps * strength) >= 1: strength 1 keeps all,
  1 / steps exactly one, anything less none (an error), 0 and above 1 are out of range."""
  assert editing.img2img_start(4, 1.0) == 0
  assert editing.img2img_start(4, 0.25) == 3
  assert editing.img2img_start(4, 0.5) == 2
  with pytest.raises(ValueError, match="keeps no step"):
    editing.img2img_start(4, float(np.nextafter(0.25, 0.0)))
  for strength in (0.0, float(np.nextafter(1.0, 2.0))):
    with pytest.raises(ValueError, match="strength must be in"):
      editing.img2img_start(4, strength)
  # Through the sampler: the trajectory holds one entry per kept grid point.
  for strength, kept in ((1.0, 4), (0.25, 1)):
    _, traj = samplers.sample(
      denoise, X_T, jax.random.key(0), SCHEDULE, sampler="ddim", steps=4, x_init=X_INIT,
      strength=strength, return_trajectory=True,
    )  # fmt: skip
    assert traj.shape[0] == kept, strength


def test_bad_editing_input():
  k = jax.random.key(0)
  with pytest.raises(ValueError, match="mask shape"):
    samplers.sample(denoise, X_T, k, SCHEDULE, steps=4, x_init=X_INIT, mask=jnp.ones((2, 4, 3, 1)))
  with pytest.raises(ValueError, match="mask shape"):
    samplers.sample(denoise, X_T, k, SCHEDULE, steps=4, x_init=X_INIT, mask=jnp.ones((4, 4)))
  with pytest.raises(ValueError, match="need x_init"):
    samplers.sample(denoise, X_T, k, SCHEDULE, steps=4, mask=MASK)
  with pytest.raises(ValueError, match="keeps no step"):
    samplers.sample(denoise, X_T, k, SCHEDULE, steps=4, x_init=X_INIT, strength=0.1)
  with pytest.raises(ValueError, match="strength must be in"):
    samplers.sample(denoise, X_T, k, SCHEDULE, steps=4, x_init=X_INIT, strength=1.5)
  with pytest.raises(ValueError, match="x_init shape"):
    samplers.sample(denoise, X_T, k, SCHEDULE, steps=4, x_init=X_INIT[:1])
  with pytest.raises(ValueError, match="without history"):
    samplers.sample(
      denoise, X_T, k, SCHEDULE, sampler="dpmpp_2m", steps=4, x_init=X_INIT, mask=MASK, resample=2
    )
