"""Layers shared by the DiT assembly and its block types: fixed embeddings, norms, MLPs, adaLN.

Nothing here knows about block types or configs; dit/models/blocks.py and
dit/models/ablation_blocks.py build transformer blocks from these, dit/models/dit.py the model.
The block options (DiT.norm, DiT.mlp) are names in NORMS and MLPS, built by `norm_layer` and
`feed_forward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

xavier_uniform = nn.initializers.xavier_uniform()
normal_02 = nn.initializers.normal(stddev=0.02)
zeros = nn.initializers.zeros

# DiT.norm: the blocks' (and final layer's) norms. DiT.mlp: the blocks' feed-forward.
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")


def sincos_pos_embed_2d(
  dim: int, grid_h: int, grid_w: int, *, base_size: float | None = None, interpolation: float = 1.0
) -> np.ndarray:
  """Fixed 2D sin-cos position embedding, (grid_h * grid_w, dim), rows in raster order.

  Positions are `arange(n) / (n / base_size) / interpolation` along each axis (PixArt); with
  base_size=None (n / base_size = 1) and interpolation=1 this is the original DiT table. The
  first half of the channels encodes the column (w), the second half the row (h), as in DiT.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a hidden size divisible by 4, got {dim}")
  pos_h = np.arange(grid_h, dtype=np.float64)
  pos_w = np.arange(grid_w, dtype=np.float64)
  if base_size is not None:
    pos_h = pos_h / (grid_h / base_size)
    pos_w = pos_w / (grid_w / base_size)
  pos_h, pos_w = pos_h / interpolation, pos_w / interpolation
  ww, hh = np.meshgrid(pos_w, pos_h)  # (grid_h, grid_w) each.

  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def embed_1d(pos):
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([embed_1d(ww), embed_1d(hh)], axis=1).astype(np.float32)


def timestep_embedding(
  t: jax.Array, dim: int = 256, max_period: float = 10000.0, freq_shift: float = 0.0
) -> jax.Array:
  """Sinusoidal timestep features [cos, sin], (B,) -> (B, dim), float32.

  freq_shift=0 is the original DiT/PixArt; diffusers' DiT port uses 1 (`downscale_freq_shift`).
  """
  half = dim // 2
  # A constant table: the exponent in float32 as the PyTorch references compute it, the exp
  # correctly rounded (XLA's and torch's float32 exp differ by an ulp, visible at t ~ 1000).
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half - freq_shift)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation: x (B, N, D); shift, scale (B, D) -> (B, N, D)."""
  return x * (1 + scale[:, None]) + shift[:, None]


def plain_layer_norm(dtype: Any) -> nn.LayerNorm:
  """LayerNorm without scale and bias (adaLN supplies them), eps 1e-6 as in DiT/PixArt."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


def rms_norm(dtype: Any, name: str | None = None) -> nn.RMSNorm:
  """RMSNorm x / sqrt(mean(x^2) + 1e-6) * scale, a learnable scale (init 1), float32 statistics.

  LightningDiT's (from LLaMA): eps 1e-6 and a learnable weight, in its blocks, final layer and
  QK-norm alike.
  """
  return nn.RMSNorm(epsilon=1e-6, dtype=dtype, name=name)


def norm_layer(kind: str, dtype: Any, *, affine: bool = False, name: str | None = None):
  """A norm over the last axis, eps 1e-6: kind "layernorm" or "rmsnorm" (NORMS).

  affine=False (adaLN blocks, which modulate right after): LayerNorm has no scale and no bias
  (`plain_layer_norm`); RMSNorm keeps its learnable scale all the same, as LightningDiT.
  affine=True (the plain pre-norm blocks): LayerNorm with scale and bias.
  """
  if kind not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
  if kind == "rmsnorm":
    return rms_norm(dtype, name)
  if affine:
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


def scale_shift_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
  """PixArt's scale_shift_table / null-caption init: torch.randn(n, D) / D ** 0.5."""
  return jax.random.normal(key, shape, dtype) / math.sqrt(shape[-1])


class TimestepEmbedder(nn.Module):
  """256-d sinusoid -> Linear -> SiLU -> Linear, (B,) -> (B, hidden)."""

  hidden_size: int
  freq_dim: int = 256
  freq_shift: float = 0.0
  dtype: Any = jnp.float32
  out_init: Callable = normal_02

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    x = timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift)
    x = nn.Dense(self.hidden_size, kernel_init=normal_02, dtype=self.dtype, name="mlp_0")(x)
    x = nn.silu(x)
    return nn.Dense(self.hidden_size, kernel_init=self.out_init, dtype=self.dtype, name="mlp_2")(x)


class Mlp(nn.Module):
  """Linear -> GELU(tanh) -> Linear, (..., D_in) -> (..., out_features)."""

  hidden_features: int
  out_features: int
  dtype: Any = jnp.float32
  kernel_init: Any = xavier_uniform

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = partial(nn.Dense, kernel_init=self.kernel_init, dtype=self.dtype)
    x = nn.gelu(dense(self.hidden_features, name="fc1")(x), approximate=True)
    return dense(self.out_features, name="fc2")(x)


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
  """SwiGLU's hidden width, int(2/3 * int(mlp_ratio * D)): LightningDiT's, not rounded up to a
  multiple (about the GELU MLP's params and MACs: 3 matmuls of 2/3 the width)."""
  return int(2 / 3 * int(hidden_size * mlp_ratio))


class SwiGLU(nn.Module):
  """SwiGLU feed-forward (Shazeer 2020): fc2(SiLU(a) * b), [a, b] = fc1(x); (..., D_in) -> out.

  fc1 is the gate and value projections fused, kernel (D_in, 2 hidden), gate first (the layout
  of LightningDiT's w12, which its w3 is fc2); both with bias.
  """

  hidden_features: int
  out_features: int
  dtype: Any = jnp.float32
  kernel_init: Any = xavier_uniform

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = partial(nn.Dense, kernel_init=self.kernel_init, dtype=self.dtype)
    gate, value = jnp.split(dense(2 * self.hidden_features, name="fc1")(x), 2, axis=-1)
    return dense(self.out_features, name="fc2")(nn.silu(gate) * value)


def feed_forward(
  kind: str, hidden_size: int, mlp_ratio: float, dtype: Any, name: str = "mlp"
) -> nn.Module:
  """The block MLP of kind "gelu" (`Mlp`, hidden mlp_ratio D) or "swiglu" (`SwiGLU`, hidden
  `swiglu_hidden`), (..., D) -> (..., D)."""
  if kind not in MLPS:
    raise ValueError(f"mlp must be one of {MLPS}, got {kind!r}")
  if kind == "swiglu":
    return SwiGLU(swiglu_hidden(hidden_size, mlp_ratio), hidden_size, dtype, name=name)
  return Mlp(int(hidden_size * mlp_ratio), hidden_size, dtype, name=name)


def check_image_and_time(model: nn.Module, x: jax.Array, t: jax.Array) -> int:
  """ValueError unless x is (B, H, W, model.in_channels) with H, W multiples of
  model.patch_size and t is (B,); returns B. Shared by every architecture's input checks."""
  if x.ndim != 4:
    raise ValueError(f"x must be (B, H, W, C), got shape {x.shape}")
  b, h, w, c = x.shape
  p = model.patch_size
  if h % p or w % p:
    raise ValueError(
      f"image size (H, W) = ({h}, {w}) must be divisible by patch_size={p}; "
      f"expected multiples of {p} such as ({model.input_size}, {model.input_size})"
    )
  if c != model.in_channels:
    raise ValueError(
      f"x has {c} channels, expected in_channels={model.in_channels} (got shape {x.shape})"
    )
  if jnp.shape(t) != (b,):
    raise ValueError(f"t must have shape (B,) = ({b},), got {jnp.shape(t)}")
  return b


def check_text(cond: dict, b: int, caption_channels: int) -> None:
  """ValueError unless cond["text"] (if given) is (B, L, caption_channels) and
  cond["text_mask"] (if given) is (B, L)."""
  if "text" not in cond:
    return
  text = cond["text"]
  if jnp.ndim(text) != 3 or text.shape[0] != b or text.shape[2] != caption_channels:
    raise ValueError(
      f"cond['text'] must be (B, L, caption_channels) = ({b}, L, {caption_channels}), "
      f"got {jnp.shape(text)}"
    )
  if "text_mask" in cond and jnp.shape(cond["text_mask"]) != text.shape[:2]:
    raise ValueError(
      f"cond['text_mask'] must be (B, L) = {text.shape[:2]} to match cond['text'], "
      f"got {jnp.shape(cond['text_mask'])}"
    )
