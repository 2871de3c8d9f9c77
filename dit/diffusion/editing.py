"""Editing with any sampler: img2img (start part-way) and inpainting (paste the known region).

Both are options of `samplers.sample` (x_init=, strength=, mask=, resample=) built from the
helpers here; they work on the plan's per-step coefficients, not inside the steps.
  img2img: keep the last round(strength * steps) grid points (diffusers' rule) and start from
    x_init noised to the first of them.
  inpainting: after every step, replace the known region (mask == 1) of the state with x_init
    noised to the state's noise level with fresh noise (the final step pastes x_init exactly).
  RePaint resampling (Lugmayr et al. 2022, jump length 1): repeat each step `resample`
    times, re-noising the state back to the step's start in between, so that the unknown
    region harmonises with the pasted one. Only for samplers without history.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def check_mask(mask: Array, shape: tuple[int, ...]) -> Array:
  """mask as float32, checked to broadcast to `shape` (same rank, each dim equal or 1)."""
  mask = jnp.asarray(mask, jnp.float32)
  ok = mask.ndim == len(shape) and all(m in (1, s) for m, s in zip(mask.shape, shape, strict=True))
  if not ok:
    raise ValueError(
      f"mask shape {mask.shape} does not match the sample shape {shape}: it needs the same "
      "rank with each dimension equal or 1 (e.g. (B, H, W, 1))"
    )
  return mask


def check_init(x_init: Array, shape: tuple[int, ...]) -> None:
  if tuple(x_init.shape) != tuple(shape):
    raise ValueError(f"x_init shape {x_init.shape} != sample shape {shape}")


def start_index(steps: int, shape, x_init, strength: float, mask, resample: int) -> int:
  """The first kept grid point (0 without x_init), after checking the editing inputs."""
  if (mask is not None or strength != 1.0) and x_init is None:
    raise ValueError("img2img (strength < 1) and inpainting (mask) need x_init")
  if resample != 1 and mask is None:
    raise ValueError("resample (RePaint) needs a mask")
  if x_init is None:
    return 0
  check_init(x_init, shape)
  return img2img_start(steps, strength)


def img2img_start(steps: int, strength: float) -> int:
  """Index of the first grid point kept for img2img at `strength` in (0, 1] (diffusers)."""
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength must be in (0, 1], got {strength}")
  kept = min(int(steps * strength), steps)
  if kept < 1:
    raise ValueError(
      f"strength={strength} keeps no step out of steps={steps}; raise strength or steps"
    )
  return steps - kept


def noised(x0: Array, z: Array, a: Array, s: Array, space: str) -> Array:
  """x0 noised to VP coefficients (a, s), in the sampler's native space."""
  x_vp = a * x0 + s * z
  return x_vp / a if space == "ve" else x_vp


def make_paste(known: Array, mask: Array, space: str):
  """paste(x, info, key) -> x with the known region replaced by `known` noised to the state."""

  def paste(x, info, key):
    z = jax.random.normal(key, x.shape, x.dtype)
    ref = noised(known, z, info["a_next"], info["s_next"], space)
    return mask * ref + (1.0 - mask) * x

  return paste


def repaint_indices(num_steps: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
  """Scan-step indices repeating every step but the last `resample` times, and the flags of
  the repeats after which the state is re-noised back to the step's start."""
  if resample < 1:
    raise ValueError(f"resample must be >= 1, got {resample}")
  reps = np.full(num_steps, resample)
  reps[-1] = 1
  idx = np.repeat(np.arange(num_steps), reps)
  renoise = np.ones_like(idx, dtype=bool)
  ends = np.cumsum(reps) - 1
  renoise[ends] = False
  return idx, renoise


def renoise(x: Array, info: dict, z: Array, space: str) -> Array:
  """Samples q(x_t | x_t') for the step t -> t' just taken: from (a_next, s_next) back to (a, s)."""
  a, s, an, sn = info["a"], info["s"], info["a_next"], info["s_next"]
  x_vp = x * an if space == "ve" else x
  ratio = a / an
  back = ratio * x_vp + jnp.sqrt(jnp.maximum(s**2 - (ratio * sn) ** 2, 0.0)) * z
  return back / a if space == "ve" else back
