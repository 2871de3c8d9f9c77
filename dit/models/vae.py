"""SD-style AutoencoderKL (the latent-diffusion VAE) in Flax Linen.

Covers the 4-channel VAE of SD 1.x/2.x (`stabilityai/sd-vae-ft-ema`, `sd-vae-ft-mse`) and the
16-channel SD3/Flux VAE (no quant convs, `shift_factor`), read from a diffusers directory
(`config.json` + `diffusion_pytorch_model.safetensors`). Flax parameter names mirror the
diffusers ones (`encoder/down_blocks_0/resnets_1/conv1/kernel` <->
`encoder.down_blocks.0.resnets.1.conv1.weight`) so the conversion is mechanical.

Images are NHWC in [-1, 1]; a VAE with `n` entries in `block_out_channels` downsamples by
`2 ** (n - 1)` (8 for SD: 256x256x3 -> 32x32x4). `AutoencoderKL.encode/decode` work on
unscaled latents; `encode_to_latents`/`decode_latents` apply `(z - shift) * scale`, which is
what the diffusion model sees.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit.models import hub_files

Array = jax.Array
_EPS = 1e-6  # Every GroupNorm in the diffusers VAE uses eps=1e-6.


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The architecture fields of a diffusers `AutoencoderKL` config.json."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  sample_size: int = 256

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, cfg: Mapping[str, Any]) -> VAEConfig:
    """Builds the config from a parsed diffusers `config.json`, rejecting variants not covered."""
    n = len(cfg.get("block_out_channels", cls.block_out_channels))
    checks = {
      "down_block_types": ["DownEncoderBlock2D"] * n,
      "up_block_types": ["UpDecoderBlock2D"] * n,
      "act_fn": "silu",
    }
    for key, expected in checks.items():
      value = cfg.get(key, expected)
      value = list(value) if isinstance(value, list | tuple) else value
      if value != expected:
        raise ValueError(f"Unsupported AutoencoderKL {key}={value!r}; expected {expected!r}.")
    sample_size = cfg.get("sample_size", cls.sample_size)
    if isinstance(sample_size, list | tuple):
      sample_size = sample_size[0]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in cfg.items() if k in fields}
    kwargs["block_out_channels"] = tuple(kwargs.get("block_out_channels", cls.block_out_channels))
    kwargs["shift_factor"] = float(cfg.get("shift_factor") or 0.0)
    kwargs["sample_size"] = int(sample_size)
    config = cls(**kwargs)
    bad = [c for c in config.block_out_channels if c % config.norm_num_groups]
    if bad:
      raise ValueError(
        f"block_out_channels {config.block_out_channels} must be divisible by "
        f"norm_num_groups={config.norm_num_groups}; {bad} are not."
      )
    return config


# ----------------------------------------------------------------------------- layers


def _conv(features: int, kernel: int, name: str, dtype: Any, stride: int = 1, pad: Any = None):
  pad = ((kernel // 2, kernel // 2),) * 2 if pad is None else pad
  return nn.Conv(features, (kernel, kernel), (stride, stride), pad, dtype=dtype, name=name)


def _group_norm(groups: int, name: str, dtype: Any):
  # The two-pass variance matches PyTorch more closely than E[x^2] - E[x]^2.
  return nn.GroupNorm(groups, epsilon=_EPS, use_fast_variance=False, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-Conv twice plus a (1x1-projected) skip; diffusers `ResnetBlock2D`."""

  features: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.silu(_group_norm(self.groups, "norm1", self.dtype)(x))
    h = _conv(self.features, 3, "conv1", self.dtype)(h)
    h = nn.silu(_group_norm(self.groups, "norm2", self.dtype)(h))
    h = _conv(self.features, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over all pixels with a residual; diffusers `Attention`."""

  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = _group_norm(self.groups, "group_norm", self.dtype)(x).reshape(b, h * w, 1, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
    y = jax.nn.dot_product_attention(q, k, v).reshape(b, h, w, c)
    return x + nn.Dense(c, dtype=self.dtype, name="to_out_0")(y)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding one pixel at the bottom/right (LDM's asymmetric pad)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, pad="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling then a 3x3 conv."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class DownBlock(nn.Module):
  features: int
  num_layers: int
  groups: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.downsample:
      x = Downsample(self.dtype, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  features: int
  num_layers: int
  groups: int
  upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.upsample:
      x = Upsample(self.dtype, name="upsamplers_0")(x)
    return x


class MidBlock(nn.Module):
  groups: int
  attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """(B, H, W, in) -> (B, H/f, W/f, 2 * latent) posterior moments before `quant_conv`."""

  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, g = self.config, self.config.norm_num_groups
    x = _conv(cfg.block_out_channels[0], 3, "conv_in", self.dtype)(x)
    last = len(cfg.block_out_channels) - 1
    for i, c in enumerate(cfg.block_out_channels):
      x = DownBlock(c, cfg.layers_per_block, g, i < last, self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
    x = nn.silu(_group_norm(g, "conv_norm_out", self.dtype)(x))
    return _conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
  """(B, h, w, latent) after `post_quant_conv` -> (B, h*f, w*f, out) images."""

  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg, g = self.config, self.config.norm_num_groups
    x = _conv(cfg.block_out_channels[-1], 3, "conv_in", self.dtype)(z)
    x = MidBlock(g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
    last = len(cfg.block_out_channels) - 1
    for i, c in enumerate(reversed(cfg.block_out_channels)):
      x = UpBlock(c, cfg.layers_per_block + 1, g, i < last, self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(g, "conv_norm_out", self.dtype)(x))
    return _conv(cfg.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
  """The KL-regularised autoencoder. Use `module.apply(params, x, method="encode"|"decode")`."""

  config: VAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, "quant_conv", self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv", self.dtype)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """Images (B, H, W, in_channels) in [-1, 1] -> posterior (mean, logvar), each (B, H/f, W/f,
    latent_channels), unscaled; logvar is clipped to [-30, 20] as in diffusers."""
    _check_images(x, self.config)
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array) -> Array:
    """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(
        f"Expected latents (B, h, w, {self.config.latent_channels}) NHWC; got shape {z.shape}."
      )
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: Array) -> Array:
    """Reconstruction from the posterior mean (touches every parameter, for `init`)."""
    return self.decode(self.encode(x)[0])


def _check_images(x: Any, config: VAEConfig) -> None:
  f = config.downsample_factor
  if x.ndim != 4 or x.shape[-1] != config.in_channels:
    raise ValueError(
      f"Expected images (B, H, W, {config.in_channels}) NHWC; got shape {tuple(x.shape)}."
    )
  if x.shape[1] % f or x.shape[2] % f:
    raise ValueError(
      f"Image size {x.shape[1]}x{x.shape[2]} is not divisible by the VAE's downsampling factor {f}."
    )


# ----------------------------------------------------------------------------- loading

_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers")
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_name(path: tuple[str, ...]) -> str:
  """Flax param path -> diffusers tensor name (`resnets_0` -> `resnets.0`, kernel -> weight)."""
  parts = []
  for p in path[:-1]:
    m = re.fullmatch(r"(.+)_(\d+)", p)
    parts.append(f"{m[1]}.{m[2]}" if m and m[1] in (*_LIST_NAMES, "to_out") else p)
  leaf = "bias" if path[-1] == "bias" else "weight"
  return ".".join([*parts, leaf])


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel":  # (in, out) -> (out, in)
    return (shape[1], shape[0])
  return tuple(shape)


def _from_torch(leaf: str, w: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and w.ndim == 4:
    return w.transpose(2, 3, 1, 0)
  if leaf == "kernel":
    return w.T
  return w


def _rename_legacy(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps pre-0.14 diffusers attention names (query/key/value/proj_attn) to the current ones.

  Older hub checkpoints (e.g. some `sd-vae-ft-*` revisions) still use them, sometimes with 1x1
  conv-shaped (C, C, 1, 1) weights.
  """
  out = {}
  for name, w in weights.items():
    parts = name.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
      name = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
    if ".attentions." in name and w.ndim == 4 and w.shape[2:] == (1, 1):
      w = w[:, :, 0, 0]
    out[name] = w
  return out


def convert_weights(
  weights: Mapping[str, np.ndarray], config: VAEConfig, source: str = "<weights>"
) -> dict:
  """Diffusers `AutoencoderKL` state dict (NumPy) -> Flax params {"params": ...}.

  Raises a ValueError naming missing/unexpected/mis-shaped tensors or non-float tensors.
  """
  weights = _rename_legacy(dict(weights))
  module = AutoencoderKL(config)
  f = config.downsample_factor
  dummy = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), dummy)["params"]
  flat = {path: s.shape for path, s in _flatten(shapes)}
  expected = {_torch_name(p): _torch_shape(p[-1], s) for p, s in flat.items()}
  hub_files.check_keys(weights, expected, source)
  not_float = [f"{k}: {w.dtype}" for k, w in weights.items() if w.dtype.kind != "f"]
  if not_float:
    raise ValueError(f"Checkpoint {source} has non-float tensors: {sorted(not_float)[:20]}.")
  params: dict = {}
  for path in flat:
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    w = np.asarray(weights[_torch_name(path)], dtype=np.float32)
    node[path[-1]] = _from_torch(path[-1], w)
  return {"params": params}


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, (*prefix, k))
    else:
      yield (*prefix, k), v


def load_vae(model_dir: str, dtype: Any = jnp.float32) -> tuple[AutoencoderKL, dict, VAEConfig]:
  """Loads a diffusers AutoencoderKL directory -> (module, params, config).

  Params are cast to `dtype`, which is also the module's compute dtype.
  """
  raw = hub_files.read_config(model_dir)
  config = VAEConfig.from_diffusers(raw)
  weights = hub_files.read_safetensors(model_dir, stem="diffusion_pytorch_model")
  params = convert_weights(weights, config, source=model_dir)
  params = jax.tree.map(lambda w: jnp.asarray(w, dtype=dtype), params)
  return AutoencoderKL(config, dtype=dtype), params, config


# ----------------------------------------------------------------------------- pure helpers


def encode_to_latents(
  module: AutoencoderKL, params: Any, images: Array, key: Array | None = None
) -> Array:
  """Images (B, H, W, C) in [-1, 1] -> scaled latents `(z - shift) * scale` (B, H/f, W/f, c).

  z is a posterior sample if `key` is given, else the posterior mean.
  """
  mean, logvar = module.apply(params, images, method=AutoencoderKL.encode)
  z = mean
  if key is not None:
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  cfg = module.config
  return (z - cfg.shift_factor) * cfg.scaling_factor


def decode_latents(
  module: AutoencoderKL,
  params: Any,
  latents: Array,
  *,
  tile_size: int | None = None,
  tile_overlap: float = 0.25,
) -> Array:
  """Scaled latents (B, h, w, c) -> images (B, h*f, w*f, C) clipped to [-1, 1].

  With `tile_size` (latent pixels), decodes overlapping tiles and blends their seams linearly,
  the algorithm of diffusers' `AutoencoderKL.tiled_decode`; memory then stays bounded for
  large images. Tiles are decoded one at a time, so call this one outside `jax.jit`.
  """
  cfg = module.config
  z = latents / cfg.scaling_factor + cfg.shift_factor
  if tile_size is None:
    x = module.apply(params, z, method=AutoencoderKL.decode)
  elif z.shape[1] <= tile_size and z.shape[2] <= tile_size:
    x = _decode_tile(module, params, z)
  else:
    x = _tiled_decode(module, params, z, tile_size, tile_overlap)
  return jnp.clip(x, -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _decode_tile(module: AutoencoderKL, params: Any, z: Array) -> Array:
  return module.apply(params, z, method=AutoencoderKL.decode)


def _tiled_decode(module: AutoencoderKL, params: Any, z: Array, tile: int, overlap: float) -> Array:
  f = module.config.downsample_factor
  stride = int(tile * (1 - overlap))
  if stride < 1:
    raise ValueError(f"tile_size={tile} with tile_overlap={overlap} leaves no stride.")
  blend = int(tile * f * overlap)  # In image pixels.
  keep = tile * f - blend
  # Each tile is blended with its (already blended) upper and left neighbours, as diffusers does.
  rows: list[list[Array]] = []
  for i in range(0, z.shape[1], stride):
    row = []
    for j in range(0, z.shape[2], stride):
      x = _decode_tile(module, params, z[:, i : i + tile, j : j + tile])
      if i > 0:
        x = _blend(rows[-1][len(row)], x, blend, axis=1)
      if j > 0:
        x = _blend(row[-1], x, blend, axis=2)
      row.append(x)
    rows.append(row)
  return jnp.concatenate(
    [jnp.concatenate([t[:, :keep, :keep] for t in row], axis=2) for row in rows], axis=1
  )


def _blend(a: Array, b: Array, extent: int, axis: int) -> Array:
  """Linearly fades the last `extent` pixels of `a` into the first ones of `b` along `axis`."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent == 0:
    return b
  shape = [1, 1, 1, 1]
  shape[axis] = extent
  ramp = (jnp.arange(extent, dtype=b.dtype) / extent).reshape(shape)
  tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
  head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
  mixed = tail * (1 - ramp) + head * ramp
  return jax.lax.dynamic_update_slice_in_dim(b, mixed, 0, axis=axis)


class VAE:
  """Bundles a loaded VAE with jitted `encode(images, key=None)` / `decode(latents)`.

  Both work on scaled latents (what the diffusion model sees).
  """

  def __init__(self, module: AutoencoderKL, params: Any, config: VAEConfig):
    self.module, self.params, self.config = module, params, config
    self._encode = jax.jit(functools.partial(encode_to_latents, module))
    self._decode = jax.jit(functools.partial(decode_latents, module))

  @classmethod
  def load(cls, model_dir: str, dtype: Any = jnp.float32) -> VAE:
    return cls(*load_vae(model_dir, dtype))

  def encode(self, images: Array, key: Array | None = None) -> Array:
    return self._encode(self.params, images, key)

  def decode(self, latents: Array, *, tile_size: int | None = None) -> Array:
    if tile_size is not None:
      return decode_latents(self.module, self.params, latents, tile_size=tile_size)
    return self._decode(self.params, latents)
