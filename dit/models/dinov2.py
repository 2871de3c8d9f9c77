"""DINOv2 ViT encoders (S/14, B/14, L/14, g/14, with or without registers) in Flax.

Loads Hugging Face checkpoints (`config.json` + `model.safetensors`, model_type `dinov2` or
`dinov2_with_registers`) from a local directory, and matches transformers' `Dinov2Model` /
`Dinov2WithRegistersModel` in float32:

  patches (conv p x p, stride p) -> [CLS, patches] + position embedding (bicubic-interpolated
  to the input's patch grid) -> [CLS, registers, patches] -> L x [LN -> attention -> layer
  scale -> residual, LN -> MLP (GELU, or SwiGLU for g/14) -> layer scale -> residual] -> LN.

Position interpolation reproduces torch's `F.interpolate(mode="bicubic", align_corners=False)`
exactly, which jax.image.resize does not: without antialiasing torch uses the cubic kernel
with a = -0.75 and clamps indices at the borders; with antialiasing (the register models) it
uses a = -0.5 (Keys, as PIL), widens the kernel when downsampling and renormalises the weights
at the borders. `interpolate_offset` = 0.1 reproduces the original facebookresearch/dinov2
models (torch.hub `dinov2_vit*14`, and transformers before the switch to `size=`), which pass
`scale_factor=(h + 0.1) / M` instead of the output size: same output size, other weights.

Parameter layout (Flax) next to the Hugging Face names it is converted from:

  cls_token, register_tokens            embeddings.cls_token, embeddings.register_tokens
  position_embeddings (1, 1 + M*M, D)   embeddings.position_embeddings
  patch_embed/kernel (p, p, C, D)       embeddings.patch_embeddings.projection.weight (D, C, p, p)
  layer_{i}/norm1, norm2                encoder.layer.{i}.norm1, norm2
  layer_{i}/attn/{query,key,value}      encoder.layer.{i}.attention.attention.{query,key,value}
  layer_{i}/attn/out                    encoder.layer.{i}.attention.output.dense
  layer_{i}/layer_scale{1,2}            encoder.layer.{i}.layer_scale{1,2}.lambda1
  layer_{i}/mlp/fc1, fc2                encoder.layer.{i}.mlp.fc1, fc2
  layer_{i}/mlp/weights_in, weights_out encoder.layer.{i}.mlp.weights_in, weights_out (SwiGLU)
  layernorm                             layernorm

(transformers 5 renames some of these in memory, q_proj ... gate_proj/up_proj/down_proj; both
spellings load.) The pure function of `make_features(config, ...)`, `features(params, images)`,
takes images in [-1, 1] (or any `value_range`), resizes them to the encoder resolution with
torch's bicubic, applies the ImageNet normalisation and returns the normalised CLS and patch
features; it runs under jit with the params as an input (REPA's frozen encoder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit.models import attention as attention_lib
from dit.models import hub_files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_TYPES = ("dinov2", "dinov2_with_registers")

_ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}

# The released DINOv2 sizes (Oquab et al. 2023): hidden size, layers, heads, SwiGLU FFN.
_PRESETS = {
  "S/14": (384, 12, 6, False),
  "B/14": (768, 12, 12, False),
  "L/14": (1024, 24, 16, False),
  "g/14": (1536, 40, 24, True),
}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """Hyper-parameters of a DINOv2 ViT; field names follow transformers' `Dinov2Config`.

  num_register_tokens > 0 is `Dinov2WithRegistersModel`. interpolate_offset and
  interpolate_antialias choose the position-embedding interpolation (module docstring);
  from a config.json they are transformers' (0.0; antialias for the register models).
  """

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: float = 4.0
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  image_size: int = 518
  patch_size: int = 14
  num_channels: int = 3
  qkv_bias: bool = True
  layerscale_value: float = 1.0
  use_swiglu_ffn: bool = False
  num_register_tokens: int = 0
  interpolate_offset: float = 0.0
  interpolate_antialias: bool = False

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(
        f"Unsupported DINOv2 hidden_act {self.hidden_act!r}; expected one of "
        f"{sorted(_ACTIVATIONS)}."
      )
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"Dinov2Config.{name} must be >= 1, got {getattr(self, name)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"DINOv2 hidden_size {self.hidden_size} is not divisible by num_attention_heads "
        f"{self.num_attention_heads}."
      )
    if self.image_size < self.patch_size:
      raise ValueError(
        f"DINOv2 image_size {self.image_size} is smaller than patch_size {self.patch_size}."
      )

  @property
  def grid_size(self) -> int:
    """M: the position embeddings are an M x M grid (plus one for CLS)."""
    return self.image_size // self.patch_size

  @property
  def mlp_hidden(self) -> int:
    """Width of the MLP; SwiGLU keeps 2/3 of it rounded up to a multiple of 8 (as DINOv2)."""
    hidden = int(self.hidden_size * self.mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden

  @classmethod
  def preset(cls, name: str, registers: bool = False) -> Dinov2Config:
    """`S/14` | `B/14` | `L/14` | `g/14` at 518 px (the released checkpoints); registers=True
    gives the 4-register variant (antialiased position interpolation, as transformers)."""
    if name not in _PRESETS:
      raise ValueError(f"Unknown DINOv2 preset {name!r}; expected one of {list(_PRESETS)}.")
    hidden, layers, heads, swiglu = _PRESETS[name]
    return cls(
      hidden_size=hidden,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      use_swiglu_ffn=swiglu,
      num_register_tokens=4 if registers else 0,
      interpolate_antialias=registers,
    )

  @classmethod
  def from_dict(cls, hf: dict[str, Any], source: str = "config.json") -> Dinov2Config:
    """Reads a transformers `Dinov2Config` / `Dinov2WithRegistersConfig` dict."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(
        f"{source} describes a {model_type!r} model; expected a DINOv2 config (model_type "
        f"one of {MODEL_TYPES})."
      )
    registers = model_type == "dinov2_with_registers"

    def square(key: str, default: int) -> int:
      value = hf.get(key, default)
      if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
          raise ValueError(f"{source}: {key}={value} is not square; DINOv2 here needs h == w.")
        value = value[0]
      return int(value)

    return cls(
      hidden_size=hf.get("hidden_size", 768),
      num_hidden_layers=hf.get("num_hidden_layers", 12),
      num_attention_heads=hf.get("num_attention_heads", 12),
      mlp_ratio=hf.get("mlp_ratio", 4),
      hidden_act=hf.get("hidden_act", "gelu"),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
      image_size=square("image_size", 224),
      patch_size=square("patch_size", 16 if registers else 14),
      num_channels=hf.get("num_channels", 3),
      qkv_bias=hf.get("qkv_bias", True),
      layerscale_value=hf.get("layerscale_value", 1.0),
      use_swiglu_ffn=hf.get("use_swiglu_ffn", False),
      num_register_tokens=hf.get("num_register_tokens", 4) if registers else 0,
      interpolate_antialias=registers,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json dict transformers reads back as this model (interpolation fields aside)."""
    ratio = self.mlp_ratio
    out = {
      "model_type": MODEL_TYPES[self.num_register_tokens > 0],
      "architectures": ["Dinov2WithRegistersModel" if self.num_register_tokens else "Dinov2Model"],
      **{
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if not f.name.startswith("interpolate_") and f.name != "num_register_tokens"
      },
    }
    out["mlp_ratio"] = int(ratio) if float(ratio).is_integer() else ratio  # An int field there.
    if self.num_register_tokens:
      out["num_register_tokens"] = self.num_register_tokens
    return out


# ----------------------------------------------------------------------------------------
# torch's bicubic resampling as matrices.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """The cubic convolution kernel W(x) with parameter a (0 for |x| >= 2), in float32 as torch."""
  x, a = np.abs(np.asarray(x, np.float32)), np.float32(a)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(np.float32)


def bicubic_weights(
  in_size: int, out_size: int, *, antialias: bool = False, scale_factor: float | None = None
) -> np.ndarray:
  """(out_size, in_size) float32 matrix W with out = W @ in along one axis.

  torch's 1-D factor of `F.interpolate(mode="bicubic", align_corners=False, antialias=...)`
  on float32 tensors, with its float32 coordinate arithmetic (which moves results by up to
  1e-4 at 512 px against float64 coordinates). With `scale_factor` (output / input, as torch
  gets it) the sampling grid uses it instead of in_size / out_size (DINOv2's +0.1 offset).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"bicubic sizes must be >= 1, got {in_size} -> {out_size}")
  f32 = np.float32
  scale = f32(in_size) / f32(out_size) if scale_factor is None else f32(1.0 / scale_factor)
  weights = np.zeros((out_size, in_size), np.float32)
  i = np.arange(out_size)
  if not antialias:
    # upsample_bicubic2d: 4 taps at floor(x) - 1 .. floor(x) + 2, indices clamped to the edge.
    src = scale * (i.astype(f32) + f32(0.5)) - f32(0.5)
    x0 = np.floor(src)
    t = np.clip(src - x0, f32(0), f32(1))
    taps = _cubic(np.stack([t + f32(1), t, f32(1) - t, (f32(1) - t) + f32(1)]), -0.75)
    x0 = x0.astype(np.int64)
    for k, w in enumerate(taps):
      np.add.at(weights, (i, np.clip(x0 - 1 + k, 0, in_size - 1)), w)
    return weights
  # _upsample_bicubic2d_aa: the a = -0.5 kernel stretched by the scale when downsampling,
  # taps cut at the borders and the weights renormalised.
  support = f32(2.0 * float(scale)) if scale >= 1 else f32(2.0)
  inv = f32(1.0 / float(scale)) if scale >= 1 else f32(1.0)
  max_taps = int(math.ceil(support)) * 2 + 1
  for row in i:
    center = f32(float(scale) * (row + 0.5))
    lo = max(int(float(center - support) + 0.5), 0)
    size = min(int(float(center + support) + 0.5), in_size) - lo
    taps = np.arange(lo, lo + min(max(size, 0), max_taps))
    w = _cubic(((taps.astype(f32) - center).astype(np.float64) + 0.5) * float(inv), -0.5)
    total = np.float32(0)
    for v in w:  # Sequential float32 sum, as the reference loop.
      total = f32(total + v)
    weights[row, taps] = w / total if total != 0 else w
  return weights


def resize_bicubic(
  images: jax.Array, size: tuple[int, int], *, antialias: bool = True
) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C) float32, torch's bicubic (align_corners=False) resize."""
  b, height, width, c = images.shape
  h, w = size
  x = images.astype(jnp.float32)
  if (height, width) == (h, w):
    return x
  wh = jnp.asarray(bicubic_weights(height, h, antialias=antialias), jnp.float32)
  ww = jnp.asarray(bicubic_weights(width, w, antialias=antialias), jnp.float32)
  hi = jax.lax.Precision.HIGHEST  # These are resampling weights, not a learned matmul.
  x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=hi)
  return jnp.einsum("pw,bowc->bopc", ww, x, precision=hi)


def interpolate_pos_embed(pos: jax.Array, grid: tuple[int, int], config: Dinov2Config):
  """(1, 1 + M*M, D) position embeddings -> (1, 1 + h*w, D) for an h x w patch grid.

  As transformers: unchanged when the grid is M x M, else the patch part is resampled in
  float32 with torch's bicubic (config.interpolate_offset / interpolate_antialias).
  """
  m = config.grid_size
  h, w = grid
  if (h, w) == (m, m):
    return pos
  if pos.shape[1] != 1 + m * m:
    raise ValueError(f"position embeddings {pos.shape} do not hold 1 + {m}x{m} positions")
  off = config.interpolate_offset

  def factor(n):
    sf = (n + off) / m if off else None
    if sf is not None and math.floor(m * sf) != n:
      raise ValueError(f"interpolate_offset {off} does not give {n} positions from {m}")
    return bicubic_weights(m, n, antialias=config.interpolate_antialias, scale_factor=sf)

  wh, ww = jnp.asarray(factor(h), jnp.float32), jnp.asarray(factor(w), jnp.float32)
  patch = pos[0, 1:].astype(jnp.float32).reshape(m, m, -1)
  patch = jnp.einsum("ym,xn,mnd->yxd", wh, ww, patch, precision=jax.lax.Precision.HIGHEST)
  patch = patch.reshape(1, h * w, -1).astype(pos.dtype)
  return jnp.concatenate([pos[:, :1], patch], axis=1)


# ----------------------------------------------------------------------------------------
# The model.


class Dinov2Attention(nn.Module):
  """Multi-head self-attention with separate q, k, v projections: (B, T, D) -> (B, T, D)."""

  config: Dinov2Config
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    b, t, d = x.shape
    heads = c.num_attention_heads
    dense = lambda name, bias: nn.Dense(
      d, use_bias=bias, dtype=self.dtype, param_dtype=jnp.float32, name=name
    )
    split = lambda y: y.reshape(b, t, heads, d // heads)
    q = split(dense("query", c.qkv_bias)(x))
    k = split(dense("key", c.qkv_bias)(x))
    v = split(dense("value", c.qkv_bias)(x))
    out = attention_lib.dot_product_attention(q, k, v, implementation=self.attention)
    return dense("out", True)(out.reshape(b, t, d))


class Dinov2MLP(nn.Module):
  """fc1 -> act -> fc2, or SwiGLU (silu(x1) * x2 with [x1, x2] = weights_in(x)) for g/14."""

  config: Dinov2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    if c.use_swiglu_ffn:
      x1, x2 = jnp.split(dense(2 * c.mlp_hidden, "weights_in")(x), 2, axis=-1)
      return dense(c.hidden_size, "weights_out")(jax.nn.silu(x1) * x2)
    return dense(c.hidden_size, "fc2")(_ACTIVATIONS[c.hidden_act](dense(c.mlp_hidden, "fc1")(x)))


def _layer_norm(config: Dinov2Config, name: str, dtype: Any) -> nn.LayerNorm:
  # Two-pass variance as torch: DINOv2 has tokens with very large activations, where
  # E[x^2] - E[x]^2 loses float32 precision.
  return nn.LayerNorm(
    epsilon=config.layer_norm_eps,
    use_fast_variance=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


class Dinov2Layer(nn.Module):
  """Pre-norm block with layer scale: (B, T, D) -> (B, T, D); the residual stays float32."""

  config: Dinov2Config
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    scale = lambda name: self.param(
      name, nn.initializers.constant(c.layerscale_value), (c.hidden_size,), jnp.float32
    )
    h = _layer_norm(c, "norm1", self.dtype)(x)
    h = Dinov2Attention(c, self.dtype, self.attention, name="attn")(h)
    x = x + h.astype(jnp.float32) * scale("layer_scale1")
    h = Dinov2MLP(c, self.dtype, name="mlp")(_layer_norm(c, "norm2", self.dtype)(x))
    return x + h.astype(jnp.float32) * scale("layer_scale2")


class Dinov2(nn.Module):
  """The DINOv2 ViT (transformers' `Dinov2Model` / `Dinov2WithRegistersModel`).

  Attributes:
    config: sizes; see `Dinov2Config`.
    dtype: compute dtype of the matmuls (float32 or bfloat16); params, the residual stream,
      layer norm statistics, softmax and the position interpolation stay float32.
    attention: backend of `dit.models.attention.dot_product_attention`.
  """

  config: Dinov2Config
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, pixel_values: jax.Array, output_layer: int | None = None) -> dict:
    """pixel_values (B, H, W, C), already ImageNet-normalised, H and W multiples of the patch.

    Returns float32 arrays, T = 1 + R + N tokens ([CLS, R registers, N = (H/p)(W/p) patches]):
      "last_hidden_state" (B, T, D): after the final layer norm (transformers' output),
      "cls" (B, D): its CLS token (`pooler_output`), "patch" (B, N, D): its patch tokens,
      "registers" (B, R, D) when R > 0, and with output_layer = k in [0, L]
      "hidden" (B, T, D): the residual stream after k layers, before any norm
      (transformers' `hidden_states[k]`; 0 = the embeddings).
    """
    c = self.config
    p, d = c.patch_size, c.hidden_size
    b, height, width, channels = pixel_values.shape
    if height % p or width % p:
      raise ValueError(
        f"DINOv2 input {height}x{width} is not divisible by its patch size {p}; resize to a "
        f"multiple of {p} (e.g. {max(1, round(height / p)) * p})."
      )
    if channels != c.num_channels:
      raise ValueError(f"DINOv2 expects {c.num_channels} channels, got images {pixel_values.shape}")
    if output_layer is not None and not 0 <= output_layer <= c.num_hidden_layers:
      raise ValueError(
        f"output_layer must be in [0, {c.num_hidden_layers}] (layers of this DINOv2), "
        f"got {output_layer}."
      )
    init = nn.initializers.truncated_normal(0.02)
    x = nn.Conv(
      d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
      name="patch_embed",
    )(pixel_values)  # fmt: skip
    h, w = height // p, width // p
    x = x.astype(jnp.float32).reshape(b, h * w, d)
    cls = self.param("cls_token", init, (1, 1, d), jnp.float32)
    pos = self.param("position_embeddings", init, (1, 1 + c.grid_size**2, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    x = x + interpolate_pos_embed(pos, (h, w), c)
    r = c.num_register_tokens
    if r:
      reg = self.param("register_tokens", nn.initializers.zeros, (1, r, d), jnp.float32)
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (b, r, d)), x[:, 1:]], axis=1)
    out = {}
    for i in range(c.num_hidden_layers):
      if output_layer == i:
        out["hidden"] = x
      x = Dinov2Layer(c, self.dtype, self.attention, name=f"layer_{i}")(x)
    if output_layer == c.num_hidden_layers:
      out["hidden"] = x
    x = _layer_norm(c, "layernorm", jnp.float32)(x)
    out.update(last_hidden_state=x, cls=x[:, 0], patch=x[:, 1 + r :])
    if r:
      out["registers"] = x[:, 1 : 1 + r]
    return out


def init_params(config: Dinov2Config, seed: int = 0) -> dict:
  """Random {"params": ...} (truncated-normal 0.02 embeddings, Flax default Dense init)."""
  size = config.grid_size * config.patch_size
  x = jnp.zeros((1, size, size, config.num_channels), jnp.float32)
  return jax.jit(Dinov2(config).init)(jax.random.key(seed), x)


# ----------------------------------------------------------------------------------------
# Preprocessing and the feature function.


def preprocess(
  images: jax.Array,
  resolution: int | None,
  *,
  value_range: tuple[float, float] = (-1.0, 1.0),
  antialias: bool = True,
  num_channels: int = 3,
) -> jax.Array:
  """(B, H, W, C) images with values in value_range -> (B, r, r, 3) ImageNet-normalised.

  Grey images (C = 1) are repeated to RGB for a 3-channel encoder; a 1-channel one gets them
  normalised by the means of the RGB statistics, (B, r, r, 1). The resize (skipped when
  already r x r) is torch's bicubic, antialiased by default (EDM2's protocol; REPA uses
  antialias=False).
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
  lo, hi = value_range
  if not hi > lo:
    raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
  x = (images.astype(jnp.float32) - lo) / (hi - lo)  # -> [0, 1]
  if x.shape[-1] == 1 and num_channels == 3:
    x = jnp.repeat(x, 3, axis=-1)
  if resolution is not None:
    x = resize_bicubic(x, (resolution, resolution), antialias=antialias)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  if x.shape[-1] == 1:  # A grey encoder (e.g. a stand-in trained on digits): the RGB means.
    mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
  return (x - mean) / std


def make_features(
  config: Dinov2Config,
  *,
  resolution: int | None = 224,
  value_range: tuple[float, float] = (-1.0, 1.0),
  antialias: bool = True,
  dtype: Any = jnp.float32,
  output_layer: int | None = None,
  attention: str = "xla",
) -> Callable[[dict, jax.Array], dict]:
  """Returns the pure function features(params, images) -> dict of float32 arrays.

  images: (B, H, W, C) with values in value_range ([-1, 1] by default, the dit convention;
  (0, 1) for [0, 1] images), C = 3 or 1 (grey, repeated), resized to resolution x resolution
  (a multiple of the patch size; None: no resize). Returns `Dinov2.__call__`'s dict: "cls"
  (B, D), "patch" (B, N, D) with N = (resolution / p)^2, "last_hidden_state", and "hidden"
  with output_layer. dtype: bfloat16 computes in bf16 with float32 params. Jit-able, and
  params can be an argument (REPA) or closed over.
  """
  p = config.patch_size
  if resolution is not None and (resolution < p or resolution % p):
    raise ValueError(
      f"DINOv2 input resolution {resolution} is not a positive multiple of its patch size {p}."
    )
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"DINOv2 dtype must be float32 or bfloat16, got {dtype!r}.")
  if output_layer is not None and not 0 <= output_layer <= config.num_hidden_layers:
    raise ValueError(
      f"output_layer must be in [0, {config.num_hidden_layers}] (layers of this DINOv2), "
      f"got {output_layer}."
    )
  model = Dinov2(config, dtype=dtype, attention=attention)

  def features(params: dict, images: jax.Array) -> dict:
    x = preprocess(
      images, resolution, value_range=value_range, antialias=antialias,
      num_channels=config.num_channels,
    )  # fmt: skip
    return model.apply(params, x, output_layer=output_layer)

  return features


def repa_features(
  config: Dinov2Config, resolution: int | None = None
) -> Callable[[dict, jax.Array], jax.Array]:
  """REPA's targets: features(params, images (B, H, W, C) in [-1, 1]) -> (B, Np, D) float32,
  the final-layernorm patch tokens, the images resized to `resolution` (None: as they are)
  without antialiasing, as REPA does. The train step and dit.data.precompute both use it."""
  fn = make_features(config, resolution=resolution, value_range=(-1.0, 1.0), antialias=False)
  return lambda params, images: fn(params, images)["patch"]


# ----------------------------------------------------------------------------------------
# Loading and saving Hugging Face checkpoints.

# transformers 5's in-memory names -> the checkpoint names (what save_pretrained writes).
_NEW_TO_OLD = (
  (".attention.q_proj.", ".attention.attention.query."),
  (".attention.k_proj.", ".attention.attention.key."),
  (".attention.v_proj.", ".attention.attention.value."),
  (".attention.o_proj.", ".attention.output.dense."),
  (".mlp.down_proj.", ".mlp.weights_out."),
)


def _hf_table(config: Dinov2Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
  """Checkpoint name -> (Flax param path, PyTorch shape, how to convert: "", "T" or "conv")."""
  c = config
  d, m = c.hidden_size, c.grid_size
  table = {
    "embeddings.cls_token": (("cls_token",), (1, 1, d), ""),
    "embeddings.position_embeddings": (("position_embeddings",), (1, 1 + m * m, d), ""),
    "embeddings.patch_embeddings.projection.weight": (
      ("patch_embed", "kernel"),
      (d, c.num_channels, c.patch_size, c.patch_size),
      "conv",
    ),
    "embeddings.patch_embeddings.projection.bias": (("patch_embed", "bias"), (d,), ""),
    "layernorm.weight": (("layernorm", "scale"), (d,), ""),
    "layernorm.bias": (("layernorm", "bias"), (d,), ""),
  }
  if c.num_register_tokens:
    shape = (1, c.num_register_tokens, d)
    table["embeddings.register_tokens"] = (("register_tokens",), shape, "")
  if c.use_swiglu_ffn:
    mlp = {"weights_in": (2 * c.mlp_hidden, d), "weights_out": (d, c.mlp_hidden)}
  else:
    mlp = {"fc1": (c.mlp_hidden, d), "fc2": (d, c.mlp_hidden)}
  for i in range(c.num_hidden_layers):
    hf, fx = f"encoder.layer.{i}.", f"layer_{i}"
    linears = {
      **{f"attention.attention.{n}": ("attn", n, (d, d)) for n in ("query", "key", "value")},
      "attention.output.dense": ("attn", "out", (d, d)),
      **{f"mlp.{n}": ("mlp", n, shape) for n, shape in mlp.items()},
    }
    for name, (module, sub, shape) in linears.items():
      table[f"{hf}{name}.weight"] = ((fx, module, sub, "kernel"), shape, "T")
      if c.qkv_bias or not name.startswith("attention.attention"):
        table[f"{hf}{name}.bias"] = ((fx, module, sub, "bias"), shape[:1], "")
    for norm in ("norm1", "norm2"):
      table[f"{hf}{norm}.weight"] = ((fx, norm, "scale"), (d,), "")
      table[f"{hf}{norm}.bias"] = ((fx, norm, "bias"), (d,), "")
    for k in (1, 2):
      table[f"{hf}layer_scale{k}.lambda1"] = ((fx, f"layer_scale{k}"), (d,), "")
  return table


def _canonical_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips a `dinov2.` model prefix and a classifier head; maps transformers 5's names
  (q_proj ..., gate_proj + up_proj) to the checkpoint names."""
  out = {}
  for key, value in weights.items():
    for prefix in ("dinov2_with_registers.", "dinov2."):
      key = key.removeprefix(prefix)
    if key.startswith("classifier.") or key == "embeddings.mask_token":
      continue  # Fine-tuning head / masked-image-modelling token: unused for features.
    for new, old in _NEW_TO_OLD:
      key = key.replace(new, old)
    out[key] = value
  for key in [k for k in out if ".mlp.gate_proj." in k]:
    up = key.replace(".gate_proj.", ".up_proj.")
    if up in out:
      out[key.replace(".gate_proj.", ".weights_in.")] = np.concatenate([out.pop(key), out.pop(up)])
  return out


def convert_hf_weights(
  weights: dict[str, np.ndarray], config: Dinov2Config, source: str = "checkpoint"
) -> dict:
  """Hugging Face DINOv2 tensors (NumPy) -> {"params": ...} float32 Flax params."""
  weights = _canonical_names(weights)
  table = _hf_table(config)
  hub_files.check_keys(weights, {k: shape for k, (_, shape, _) in table.items()}, source)
  params: dict[str, Any] = {}
  for key, (path, _, how) in table.items():
    value = np.asarray(weights[key], np.float32)
    if how == "T":
      value = value.T
    elif how == "conv":
      value = value.transpose(2, 3, 1, 0)  # (D, C, p, p) -> (p, p, C, D)
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(value)
  return {"params": params}


def check_model_dir(model_dir: str) -> dict:
  """The config.json dict of a DINOv2 directory; FileNotFoundError / ValueError naming
  what is missing or wrong (before any weights are read)."""
  if not model_dir or not os.path.isdir(model_dir):
    raise FileNotFoundError(f"DINOv2 model directory {model_dir!r} does not exist.")
  have = sorted(os.listdir(model_dir))
  missing = [] if "config.json" in have else ["config.json"]
  if not set(have) & {"model.safetensors", "model.safetensors.index.json"}:
    missing.append("model.safetensors (or model.safetensors.index.json + shards)")
  if missing:
    raise FileNotFoundError(
      f"DINOv2 model directory {model_dir!r} is missing {missing}; it holds {have}."
    )
  hf = hub_files.read_config(model_dir)
  Dinov2Config.from_dict(hf, source=os.path.join(model_dir, "config.json"))
  return hf


def load_dinov2(model_dir: str) -> tuple[Dinov2Config, dict]:
  """Loads a local Hugging Face DINOv2 directory (config.json + safetensors, single or sharded).

  Returns (config, params) with params = {"params": ...} float32 (bf16 checkpoints are
  upcast); use with `make_features(config)` or `Dinov2(config).apply(params, x)`.
  """
  hf = check_model_dir(model_dir)
  config = Dinov2Config.from_dict(hf, source=os.path.join(model_dir, "config.json"))
  params = convert_hf_weights(hub_files.read_safetensors(model_dir), config, source=model_dir)
  return config, params


def save_hf(model_dir: str, config: Dinov2Config, params: dict) -> None:
  """Writes params as a Hugging Face directory (config.json + model.safetensors) that
  transformers' `Dinov2Model` / `Dinov2WithRegistersModel.from_pretrained` and
  `load_dinov2` read (e.g. a small encoder trained here standing in for DINOv2)."""
  from safetensors.numpy import save_file

  p = params.get("params", params)
  tensors = {}
  for key, (path, _, how) in _hf_table(config).items():
    value = p
    for name in path:
      value = value[name]
    value = np.asarray(jax.device_get(value), np.float32)
    if how == "T":
      value = value.T
    elif how == "conv":
      value = value.transpose(3, 2, 0, 1)
    tensors[key] = np.ascontiguousarray(value)
  os.makedirs(model_dir, exist_ok=True)
  save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(model_dir, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f, indent=2)
