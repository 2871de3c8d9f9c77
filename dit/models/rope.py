"""Rotary position embeddings (RoPE) over N position axes: 2D axial for images, 3D for Flux.

Each axis a gets axes_dim[a] channels of the head dimension (their sum is the head dim); in
those channels, adjacent pairs (2 i, 2 i + 1) are rotated by the angle pos_a * theta **
(-2 i / axes_dim[a]). This is the interleaved-pair convention of EVA-02 / LightningDiT's
VisionRotaryEmbeddingFast and of Flux (diffusers' `get_1d_rotary_pos_embed(...,
repeat_interleave_real=True)` with `apply_rotary_emb(..., use_real_unbind_dim=-1)`).

Shapes: N tokens, A position axes, H heads, Dh head dim = sum(axes_dim).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_axes(head_dim: int, axes_dim: Sequence[int]) -> None:
  """Raises ValueError unless every axis has an even width and the widths sum to head_dim."""
  if sum(axes_dim) != head_dim or any(a <= 0 or a % 2 for a in axes_dim):
    raise ValueError(
      f"RoPE axes_dim={tuple(axes_dim)} must be positive even widths summing to the head "
      f"dimension {head_dim}"
    )


def axial_dims(head_dim: int, n_axes: int = 2) -> tuple[int, ...]:
  """Equal even widths for n_axes axes (2D axial RoPE: Dh / 2 each, so Dh % 4 == 0)."""
  if head_dim % (2 * n_axes):
    raise ValueError(
      f"{n_axes}D axial RoPE needs a head dimension divisible by {2 * n_axes}, got {head_dim} "
      f"(hidden_size / num_heads)"
    )
  return (head_dim // n_axes,) * n_axes


def rope_angles(
  positions: jax.Array | np.ndarray, axes_dim: Sequence[int], theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
  """(..., N, A) positions -> (cos, sin), each (..., N, sum(axes_dim)) float32.

  Each frequency appears twice in a row (one per channel of its pair). NumPy positions are
  computed in float64 (as diffusers does), traced ones in float32.
  """
  if positions.shape[-1] != len(axes_dim):
    raise ValueError(
      f"positions have {positions.shape[-1]} axes (last dim of {positions.shape}), but "
      f"axes_dim={tuple(axes_dim)} has {len(axes_dim)}"
    )
  xp = np if isinstance(positions, np.ndarray) else jnp
  dtype = np.float64 if xp is np else jnp.float32
  angles = []
  for a, dim in enumerate(axes_dim):
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angle = positions[..., a : a + 1].astype(dtype) * freqs.astype(dtype)
    angles.append(xp.repeat(angle, 2, axis=-1))
  angle = xp.concatenate(angles, axis=-1)
  return jnp.asarray(xp.cos(angle), jnp.float32), jnp.asarray(xp.sin(angle), jnp.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x (B, N, H, Dh) by cos, sin (N, Dh) or (B, N, Dh); float32 math, x's dtype out."""
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None], sin[:, :, None]  # (B or 1, N, 1, Dh).
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (xf * cos + rotated * sin).astype(x.dtype)


def grid_positions(grid_h: int, grid_w: int, *, scale: float = 1.0) -> np.ndarray:
  """(grid_h * grid_w, 2) float64 (row, column) positions in raster order, times scale."""
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1).astype(np.float64) * scale
