"""Flux (Black Forest Labs): double-stream then single-stream blocks over [text, image] tokens.

x (B, H, W, C) NHWC latents are packed into 2 x 2 patches (channels in diffusers'
`_pack_latents` order (c, p, q), so converted weights need no permutation), embedded by a
Linear (img_in); the caption (B, L, caption_channels) by another (txt_in). A vector
vec = time_in(t) [+ guidance_in(1000 w)] + vector_in(pooled) modulates every block:

  double_blocks/blocks_{i}  (diffusers' FluxTransformerBlock) per stream: adaLN-Zero (6
    modulations), q/k/v with RMSNorm QK-norm, one joint attention over [text, image] with
    3-axis RoPE, per-stream output projection and GELU(tanh) MLP, gated residuals.
  single_blocks/blocks_{i}  (FluxSingleTransformerBlock) on the joint sequence: adaLN-Zero
    (3 modulations), parallel attention + MLP from one Linear (linear1), linear2 on their
    concatenation, gated residual.
  final_layer               the image tokens: LayerNorm, scale then shift (diffusers'
    AdaLayerNormContinuous order; BFL's checkpoints store shift first), Linear, unpacked.

Parameter names follow BFL's original Flux code (img_in, txt_in, time_in, vector_in,
guidance_in, img_attn/qkv, linear1, ...); `diffusers_params` maps diffusers'
FluxTransformer2DModel onto them.

Conventions:
  time      the model embeds t as given. diffusers' model multiplies its timestep (a sigma in
            [0, 1]) by 1000 inside forward; dit's flow samplers pass Flow.model_time(t) = 1000 t,
            so Flux configs use config.flow.time_scale = 1000.
  guidance  cond["guidance"] is the guidance scale w; it is embedded as 1000 w (diffusers
            multiplies by 1000 too; as DiT's LCM guidance embedding).
  positions RoPE ids as Flux: text tokens (0, 0, 0), image tokens (0, row, col) on the packed
            grid; axes_dim splits the head dimension, theta 10000 (dit/models/rope.py).
  text mask diffusers' Flux does not mask text tokens in attention (padding tokens are
            attended to), and neither does this model, for parity. cond["text_mask"] only
            weights the mean of the caption that is the pooled vector when pooled_channels = 0.

Shapes: B batch, L text tokens, N = (H / 2) (W / 2) image tokens, D hidden size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import traverse_util
from tqdm import tqdm

from dit.models import hub_files, layouts, repeat, rope
from dit.models.attention import dot_product_attention
from dit.models.layers import (
  Mlp,
  check_image_and_time,
  modulate,
  normal_02,
  plain_layer_norm,
  scale_shift_init,
  timestep_embedding,
  xavier_uniform,
  zeros,
)

NULL_CAPTIONS = ("learned", "zeros")


class MLPEmbedder(nn.Module):
  """Linear -> SiLU -> Linear (BFL's MLPEmbedder; diffusers' TimestepEmbedding and its
  PixArtAlphaTextProjection(act_fn="silu")), (B, in) -> (B, hidden_size)."""

  hidden_size: int
  dtype: Any = jnp.float32
  out_init: Any = normal_02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden_size, kernel_init=normal_02, dtype=self.dtype, name="in_layer")(x)
    x = nn.silu(x)
    return nn.Dense(
      self.hidden_size, kernel_init=self.out_init, dtype=self.dtype, name="out_layer"
    )(x)


def _qk_norm(dtype, name: str) -> nn.RMSNorm:
  """RMSNorm over the head dimension with a learned scale, eps 1e-6 (diffusers' norm_q/k)."""
  return nn.RMSNorm(epsilon=1e-6, dtype=dtype, name=name)


class StreamAttention(nn.Module):
  """One stream's half of the joint attention: q/k/v (with QK-norm) in, projection out."""

  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32

  def setup(self):
    d = self.hidden_size
    self.qkv = nn.Dense(3 * d, kernel_init=xavier_uniform, dtype=self.dtype)
    self.query_norm = _qk_norm(self.dtype, None)
    self.key_norm = _qk_norm(self.dtype, None)
    self.proj = nn.Dense(d, kernel_init=xavier_uniform, dtype=self.dtype)

  def heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, S, D) -> q, k, v, each (B, S, heads, D / heads); q and k normalised."""
    b, s, d = x.shape
    qkv = self.qkv(x).reshape(b, s, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype), v

  def out(self, x: jax.Array) -> jax.Array:
    """(B, S, D) attention output -> (B, S, D)."""
    return self.proj(x)


def _attention(q, k, v, cos, sin, implementation: str) -> jax.Array:
  """RoPE on q and k (B, S, H, Dh), then attention over all S tokens -> (B, S, H Dh)."""
  q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
  out = dot_product_attention(q, k, v, None, implementation=implementation)
  return out.reshape(*out.shape[:2], -1)


class BlockFields(nn.Module):
  """The fields both block types take (a stack's `_StackSettings.fields`)."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32


class DoubleStreamBlock(BlockFields):
  """diffusers' FluxTransformerBlock on the joint sequence x = [text (text_length), image]."""

  text_length: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, vec: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, L + N, D); vec: (B, D); cos, sin: (L + N, Dh) -> (B, L + N, D)."""
    d, dtype, length = self.hidden_size, self.dtype, self.text_length
    streams = {"txt": x[:, :length], "img": x[:, length:]}
    mods, attns, qkv = {}, {}, {}
    for s, h in streams.items():  # Text first: the joint sequence is [text, image].
      mod = nn.Dense(6 * d, kernel_init=zeros, dtype=dtype, name=f"{s}_mod")(nn.silu(vec))
      mods[s] = jnp.split(mod, 6, axis=-1)  # shift, scale, gate (attention), then (MLP).
      attns[s] = StreamAttention(d, self.num_heads, dtype, name=f"{s}_attn")
      shift, scale = mods[s][0], mods[s][1]
      qkv[s] = attns[s].heads(modulate(plain_layer_norm(dtype)(h), shift, scale))
    q, k, v = (jnp.concatenate([qkv["txt"][i], qkv["img"][i]], axis=1) for i in range(3))
    joint = _attention(q, k, v, cos, sin, self.attention_impl)
    outs = {"txt": joint[:, :length], "img": joint[:, length:]}
    for s, h in streams.items():
      _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[s]
      h = h + gate_msa[:, None] * attns[s].out(outs[s])
      mlp = Mlp(int(d * self.mlp_ratio), d, dtype, name=f"{s}_mlp")
      h = h + gate_mlp[:, None] * mlp(modulate(plain_layer_norm(dtype)(h), shift_mlp, scale_mlp))
      streams[s] = h
    return jnp.concatenate([streams["txt"], streams["img"]], axis=1)


class SingleStreamBlock(BlockFields):
  """diffusers' FluxSingleTransformerBlock: parallel attention and MLP on x = [text, image]."""

  @nn.compact
  def __call__(self, x: jax.Array, vec: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, S, D); vec: (B, D); cos, sin: (S, Dh) -> (B, S, D)."""
    d, dtype, heads = self.hidden_size, self.dtype, self.num_heads
    b, s, _ = x.shape
    hidden = int(d * self.mlp_ratio)
    mod = nn.Dense(3 * d, kernel_init=zeros, dtype=dtype, name="modulation")(nn.silu(vec))
    shift, scale, gate = jnp.split(mod, 3, axis=-1)
    h = modulate(plain_layer_norm(dtype)(x), shift, scale)
    # One Linear gives q, k, v and the MLP's hidden layer (BFL's linear1).
    h = nn.Dense(3 * d + hidden, kernel_init=xavier_uniform, dtype=dtype, name="linear1")(h)
    qkv, mlp = h[..., : 3 * d], h[..., 3 * d :]
    qkv = qkv.reshape(b, s, 3, heads, d // heads)
    q = _qk_norm(dtype, "query_norm")(qkv[:, :, 0]).astype(qkv.dtype)
    k = _qk_norm(dtype, "key_norm")(qkv[:, :, 1]).astype(qkv.dtype)
    attn = _attention(q, k, qkv[:, :, 2], cos, sin, self.attention_impl)
    h = jnp.concatenate([attn, nn.gelu(mlp, approximate=True)], axis=-1)
    h = nn.Dense(d, kernel_init=xavier_uniform, dtype=dtype, name="linear2")(h)
    return x + gate[:, None] * h


class FinalLayer(nn.Module):
  """AdaLayerNormContinuous (LayerNorm, then scale and shift from vec) + Linear, (B, N, out)."""

  hidden_size: int
  out_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
    mod = nn.Dense(
      2 * self.hidden_size, kernel_init=zeros, dtype=self.dtype, name="adaLN_modulation_1"
    )(nn.silu(vec))
    scale, shift = jnp.split(mod, 2, axis=-1)  # diffusers' order: scale first.
    x = modulate(plain_layer_norm(self.dtype)(x), shift, scale)
    return nn.Dense(self.out_features, kernel_init=zeros, dtype=self.dtype, name="linear")(x)


@dataclasses.dataclass(frozen=True)
class _StackSettings:
  """What `repeat.repeat_blocks` reads of a stack: depth, how it runs, and the block fields."""

  depth: int
  fields: tuple[tuple[str, Any], ...]
  scan: bool = False
  remat: bool = False
  remat_policy: str = ""

  def block_fields(self) -> dict[str, Any]:
    return dict(self.fields)


class _Stack(nn.Module):
  """A stack of `block_cls` blocks, children blocks_{i} (so params are <name>/blocks_{i})."""

  block_cls: type[nn.Module]
  settings: _StackSettings

  @nn.compact
  def __call__(self, x: jax.Array, *args: jax.Array) -> jax.Array:
    return repeat.repeat_blocks(self.block_cls, self.settings, x, *args)


def token_positions(text_length: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Flux's RoPE ids, (L + N, 3) float64: text (0, 0, 0), then image (0, row, col) in raster
  order on the packed grid."""
  image = np.concatenate([np.zeros((grid_h * grid_w, 1)), rope.grid_positions(grid_h, grid_w)], 1)
  return np.concatenate([np.zeros((text_length, 3)), image], axis=0)


class Flux(nn.Module):
  """The Flux transformer (FLUX.1 [dev] / [schnell] are hidden_size=3072, depth=19,
  single_depth=38, num_heads=24, axes_dim=(16, 56, 56), caption_channels=4096 (T5-XXL),
  pooled_channels=768 (CLIP-L); dev has guidance_embedding).

  Attributes:
    input_size: training side H = W of x (latents); other sizes divisible by patch_size work
      (RoPE has no fixed table). Flow configs read it for the token count (dynamic shift).
    patch_size: the packing, 2 as Flux (diffusers' model sees the packed tokens, patch 1).
    in_channels: C of x (16 for Flux's VAE); out_channels = in_channels.
    hidden_size, num_heads, mlp_ratio: transformer size; head dim = hidden_size / num_heads.
    depth: double-stream blocks; single_depth: single-stream blocks.
    axes_dim: RoPE widths of the 3 id axes, summing to the head dim; rope_theta: RoPE base.
    caption_channels: width of the text embeddings (> 0: Flux always has a caption).
    caption_length: tokens of the learned null caption, and of `example_inputs`' caption.
    pooled_channels: > 0: cond["pooled"] (B, pooled_channels) is the pooled text vector (CLIP
      in Flux); 0: the masked mean of cond["text"] is (projection input caption_channels).
    null_caption: the caption of cond["drop"] rows: "learned" (a param y_embedding,
      (caption_length, caption_channels)) or "zeros" (zero embeddings; converted checkpoints,
      which learnt no null caption). Dropped rows' pooled vector is zero (pooled_channels > 0)
      or the mean of the null caption.
    guidance_embedding: cond["guidance"] (B,), the guidance scale w, is embedded as 1000 w and
      added to vec (FLUX.1 [dev]; a fresh embedder's output layer starts at zero).
    num_classes, learn_sigma: fixed 0 and False (text-only, no variance), read by the
      framework as for DiT.
    attention_impl, dtype, remat, remat_policy, scan: as DiT's (both stacks).
  """

  input_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  hidden_size: int = 3072
  depth: int = 19
  single_depth: int = 38
  num_heads: int = 24
  mlp_ratio: float = 4.0
  axes_dim: tuple[int, ...] = (16, 56, 56)
  rope_theta: float = 10000.0
  caption_channels: int = 4096
  caption_length: int = 512
  pooled_channels: int = 768
  null_caption: str = "zeros"
  guidance_embedding: bool = False
  num_classes: int = 0
  learn_sigma: bool = False
  attention_impl: str = "xla"
  dtype: Any = "float32"
  remat: bool = False
  remat_policy: str = ""
  scan: bool = False

  @property
  def out_channels(self) -> int:
    return self.in_channels

  def _check_fields(self) -> None:
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
      )
    head_dim = self.hidden_size // self.num_heads
    if sum(self.axes_dim) != head_dim or any(a <= 0 or a % 2 for a in self.axes_dim):
      raise ValueError(
        f"Flux axes_dim={tuple(self.axes_dim)} must be positive even widths summing to the head "
        f"dimension hidden_size / num_heads = {self.hidden_size} / {self.num_heads} = {head_dim}"
        f" (they sum to {sum(self.axes_dim)})"
      )
    if len(self.axes_dim) != 3:
      raise ValueError(f"Flux axes_dim needs 3 widths (its ids are 3-D), got {self.axes_dim}")
    if self.caption_channels <= 0:
      raise ValueError(
        f"Flux needs a text input: caption_channels must be > 0, got {self.caption_channels}"
      )
    if self.num_classes:
      raise ValueError(
        f"Flux is text-conditioned only: num_classes must be 0, got {self.num_classes}"
      )
    if self.learn_sigma:
      raise ValueError("Flux predicts no variance: learn_sigma must be False")
    if self.null_caption not in NULL_CAPTIONS:
      raise ValueError(f"null_caption must be one of {NULL_CAPTIONS}, got {self.null_caption!r}")
    if self.pooled_channels < 0 or self.patch_size < 1 or min(self.depth, self.single_depth) < 0:
      raise ValueError(
        f"pooled_channels, depth, single_depth must be >= 0 and patch_size >= 1, got "
        f"{self.pooled_channels}, {self.depth}, {self.single_depth}, {self.patch_size}"
      )
    if self.remat_policy not in repeat.REMAT_POLICIES:
      policies = sorted(name for name in repeat.REMAT_POLICIES if name)
      raise ValueError(f"remat_policy must be '' or one of {policies}, got {self.remat_policy!r}")
    if self.remat and self.remat_policy.startswith("offload") and not self.scan:
      raise ValueError(f"remat_policy={self.remat_policy!r} needs scan=True")

  def _check_inputs(self, x, t, cond) -> None:
    b = check_image_and_time(self, x, t)
    if "text" not in cond:
      raise ValueError(
        f"Flux needs cond['text'] (B, L, caption_channels) = ({b}, L, {self.caption_channels}); "
        f"cond has {sorted(cond)}"
      )
    text = cond["text"]
    if jnp.ndim(text) != 3 or text.shape[0] != b or text.shape[2] != self.caption_channels:
      raise ValueError(
        f"cond['text'] must be (B, L, caption_channels) = ({b}, L, {self.caption_channels}), "
        f"got {jnp.shape(text)}"
      )
    if self.null_caption == "learned" and text.shape[1] > self.caption_length:
      raise ValueError(
        f"cond['text'] has {text.shape[1]} tokens, more than caption_length="
        f"{self.caption_length} (the length of the learned null caption)"
      )
    expected = {"text_mask": text.shape[:2], "drop": (b,)}
    if self.guidance_embedding:
      expected["guidance"] = (b,)
    if self.pooled_channels:
      expected["pooled"] = (b, self.pooled_channels)
    for key, shape in expected.items():
      required = key in ("guidance", "pooled")
      if key not in cond and required:
        why = "guidance_embedding=True" if key == "guidance" else "pooled_channels > 0"
        raise ValueError(f"{why} needs cond[{key!r}] of shape {shape}; cond has {sorted(cond)}")
      if key in cond and jnp.shape(cond[key]) != shape:
        raise ValueError(f"cond[{key!r}] must have shape {shape}, got {jnp.shape(cond[key])}")
    if "pooled" in cond and not self.pooled_channels:
      raise ValueError(
        "cond['pooled'] was given but pooled_channels=0 (the pooled vector is the masked mean "
        "of cond['text']); set pooled_channels to its width"
      )

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping | None = None) -> jax.Array:
    """Predicts the flow velocity (or whatever the objective trained) at x, t.

    Args:
      x: (B, H, W, in_channels) latents.
      t: (B,) model time, embedded as given (1000 sigma for Flux: config.flow.time_scale).
      cond: "text" (B, L, caption_channels), optional "text_mask" (B, L) (1 = real token;
        only the pooled mean reads it), "drop" (B,) bool (null caption rows), "pooled"
        (B, pooled_channels) (required iff pooled_channels > 0), "guidance" (B,) the
        guidance scale (required iff guidance_embedding).

    Returns:
      (B, H, W, in_channels) float32.
    """
    self._check_fields()
    cond = dict(cond or {})
    self._check_inputs(x, t, cond)
    dtype = jnp.dtype(self.dtype)
    b, h, w, _ = x.shape
    p, d = self.patch_size, self.hidden_size
    gh, gw = h // p, w // p

    # diffusers' _pack_latents: (c, p, q) channel order per patch.
    img = rearrange(x, "b (h p) (w q) c -> b (h w) (c p q)", p=p, q=p).astype(dtype)
    img = nn.Dense(d, kernel_init=xavier_uniform, dtype=dtype, name="img_in")(img)
    text, pooled = self._caption(cond, b)
    txt = nn.Dense(d, kernel_init=xavier_uniform, dtype=dtype, name="txt_in")(text.astype(dtype))
    vec = self._vector(t, cond, pooled, dtype)

    length = txt.shape[1]
    cos, sin = rope.rope_angles(token_positions(length, gh, gw), self.axes_dim, self.rope_theta)
    fields = dict(
      hidden_size=d,
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      attention_impl=self.attention_impl,
      dtype=dtype,
    )
    run = dict(scan=self.scan, remat=self.remat, remat_policy=self.remat_policy)
    double = _StackSettings(self.depth, tuple({**fields, "text_length": length}.items()), **run)
    single = _StackSettings(self.single_depth, tuple(fields.items()), **run)
    tokens = jnp.concatenate([txt, img], axis=1)
    tokens = _Stack(DoubleStreamBlock, double, name="double_blocks")(tokens, vec, cos, sin)
    tokens = _Stack(SingleStreamBlock, single, name="single_blocks")(tokens, vec, cos, sin)

    out = FinalLayer(d, p * p * self.out_channels, dtype, name="final_layer")(
      tokens[:, length:], vec
    )
    out = rearrange(out, "b (h w) (c p q) -> b (h p) (w q) c", h=gh, w=gw, p=p, q=p)
    return out.astype(jnp.float32)

  def _caption(self, cond, b) -> tuple[jax.Array, jax.Array]:
    """(text (B, L, caption_channels), pooled (B, pooled or caption channels)), float32,
    with cond["drop"] rows replaced by the null caption and its pooled vector."""
    text = jnp.asarray(cond["text"], jnp.float32)
    length, cc = text.shape[1], self.caption_channels
    drop = jnp.asarray(cond.get("drop", jnp.zeros((b,), bool)), bool)
    if self.null_caption == "learned":
      null = self.param("y_embedding", scale_shift_init, (self.caption_length, cc))[:length]
    else:
      null = jnp.zeros((length, cc), jnp.float32)
    text = jnp.where(drop[:, None, None], null[None], text)
    if self.pooled_channels:
      pooled = jnp.asarray(cond["pooled"], jnp.float32)
      return text, jnp.where(drop[:, None], 0.0, pooled)
    mask = jnp.asarray(cond.get("text_mask", jnp.ones((b, length))), jnp.float32)
    mask = jnp.where(drop[:, None], 1.0, mask)  # The null caption is all real tokens.
    pooled = (text * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1), 1.0)[:, None]
    return text, pooled

  def _vector(self, t, cond, pooled, dtype) -> jax.Array:
    """vec (B, D): time_in(t) [+ guidance_in(1000 w)] + vector_in(pooled)."""
    d = self.hidden_size
    vec = MLPEmbedder(d, dtype, name="time_in")(timestep_embedding(t, 256).astype(dtype))
    if self.guidance_embedding:
      w = 1000.0 * jnp.asarray(cond["guidance"], jnp.float32)
      emb = timestep_embedding(w, 256).astype(dtype)
      vec = vec + MLPEmbedder(d, dtype, out_init=zeros, name="guidance_in")(emb)
    return vec + MLPEmbedder(d, dtype, name="vector_in")(pooled.astype(dtype))

  def example_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array, dict]:
    """Zero inputs (x, t, cond) of the training shapes: x (B, S, S, C), t (B,), cond with
    "text" (B, caption_length, caption_channels), "text_mask", "pooled" (with
    pooled_channels), "guidance" (with guidance_embedding)."""
    b, s = batch_size, self.input_size
    x = jnp.zeros((b, s, s, self.in_channels), jnp.float32)
    t = jnp.zeros((b,), jnp.float32)
    cond = {
      "text": jnp.zeros((b, self.caption_length, self.caption_channels), jnp.float32),
      "text_mask": jnp.ones((b, self.caption_length), jnp.int32),
    }
    if self.pooled_channels:
      cond["pooled"] = jnp.zeros((b, self.pooled_channels), jnp.float32)
    if self.guidance_embedding:
      cond["guidance"] = jnp.ones((b,), jnp.float32)
    return x, t, cond


def build_model(kwargs: Mapping[str, Any]) -> Flux:
  """Flux from config.model's fields (without arch and the training keys); unknown keys and
  bad values are a ValueError naming them."""
  kwargs = dict(kwargs)
  fields = set(Flux.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
      f"Unknown config.model fields {unknown} for arch='flux'; Flux accepts {sorted(fields)}"
    )
  if "axes_dim" in kwargs:
    kwargs["axes_dim"] = tuple(int(a) for a in kwargs["axes_dim"])
  model = Flux(**kwargs)
  model._check_fields()
  return model


# ----------------------------------------------------------------------------------------------
# diffusers' FluxTransformer2DModel -> Flux params.
#
# A rule: (Flax path, ((torch name, torch shape), ...), kind); kinds as dit/models/layouts.py
# ("dense": Linear weights concatenated along out, transposed; "bias"; "copy"). linear1 fuses
# to_q, to_k, to_v and proj_mlp (unequal widths), so each torch tensor carries its own shape.

FluxRule = tuple[tuple[str, ...], tuple[tuple[str, tuple[int, ...]], ...], str]


def _linear(path: tuple[str, ...], torch: list[tuple[str, int]], in_features: int) -> list:
  """Kernel and bias rules of one Dense fed by the torch Linears [(name, out_features)]."""
  return [
    (path + ("kernel",), tuple((f"{n}.weight", (o, in_features)) for n, o in torch), "dense"),
    (path + ("bias",), tuple((f"{n}.bias", (o,)) for n, o in torch), "bias"),
  ]


def diffusers_rules(model: Flux) -> list[FluxRule]:
  """Rules from diffusers' FluxTransformer2DModel names onto `model`'s params."""
  d, dh = model.hidden_size, model.hidden_size // model.num_heads
  hidden = int(d * model.mlp_ratio)
  packed = model.patch_size**2 * model.in_channels
  emb = "time_text_embed"
  rules = [
    *_linear(("img_in",), [("x_embedder", d)], packed),
    *_linear(("txt_in",), [("context_embedder", d)], model.caption_channels),
    *_linear(("time_in", "in_layer"), [(f"{emb}.timestep_embedder.linear_1", d)], 256),
    *_linear(("time_in", "out_layer"), [(f"{emb}.timestep_embedder.linear_2", d)], d),
    *_linear(
      ("vector_in", "in_layer"),
      [(f"{emb}.text_embedder.linear_1", d)],
      model.pooled_channels or model.caption_channels,
    ),
    *_linear(("vector_in", "out_layer"), [(f"{emb}.text_embedder.linear_2", d)], d),
    *_linear(("final_layer", "adaLN_modulation_1"), [("norm_out.linear", 2 * d)], d),
    *_linear(("final_layer", "linear"), [("proj_out", packed)], d),
  ]
  if model.guidance_embedding:
    rules += _linear(("guidance_in", "in_layer"), [(f"{emb}.guidance_embedder.linear_1", d)], 256)
    rules += _linear(("guidance_in", "out_layer"), [(f"{emb}.guidance_embedder.linear_2", d)], d)
  norm = lambda path, name: (path, ((f"{name}.weight", (dh,)),), "copy")
  for i in range(model.depth):
    f, t = ("double_blocks", f"blocks_{i}"), f"transformer_blocks.{i}"
    streams = {
      "img": ("norm1", ["to_q", "to_k", "to_v"], "norm_q", "norm_k", "to_out.0", "ff"),
      "txt": ("norm1_context", ["add_q_proj", "add_k_proj", "add_v_proj"], "norm_added_q",
              "norm_added_k", "to_add_out", "ff_context"),
    }  # fmt: skip
    for s, (mod, qkv, qn, kn, out, ff) in streams.items():
      rules += _linear(f + (f"{s}_mod",), [(f"{t}.{mod}.linear", 6 * d)], d)
      rules += _linear(f + (f"{s}_attn", "qkv"), [(f"{t}.attn.{n}", d) for n in qkv], d)
      rules.append(norm(f + (f"{s}_attn", "query_norm", "scale"), f"{t}.attn.{qn}"))
      rules.append(norm(f + (f"{s}_attn", "key_norm", "scale"), f"{t}.attn.{kn}"))
      rules += _linear(f + (f"{s}_attn", "proj"), [(f"{t}.attn.{out}", d)], d)
      rules += _linear(f + (f"{s}_mlp", "fc1"), [(f"{t}.{ff}.net.0.proj", hidden)], d)
      rules += _linear(f + (f"{s}_mlp", "fc2"), [(f"{t}.{ff}.net.2", d)], hidden)
  for i in range(model.single_depth):
    f, t = ("single_blocks", f"blocks_{i}"), f"single_transformer_blocks.{i}"
    rules += _linear(f + ("modulation",), [(f"{t}.norm.linear", 3 * d)], d)
    qkv = [(f"{t}.attn.to_{n}", d) for n in "qkv"]
    rules += _linear(f + ("linear1",), [*qkv, (f"{t}.proj_mlp", hidden)], d)
    rules.append(norm(f + ("query_norm", "scale"), f"{t}.attn.norm_q"))
    rules.append(norm(f + ("key_norm", "scale"), f"{t}.attn.norm_k"))
    rules += _linear(f + ("linear2",), [(f"{t}.proj_out", d)], d + hidden)
  return rules


def diffusers_kwargs(
  cfg: Mapping[str, Any],
  source: str = "<config>",
  *,
  input_size: int = 128,
  caption_length: int = 512,
) -> dict:
  """Flux kwargs of a diffusers FluxTransformer2DModel config.json (checked to be supported).

  input_size: latent side the converted config samples at (128: Flux's 1024 px); the weights
  do not fix it. caption_length: T5 tokens per prompt (512 for [dev], 256 for [schnell]).
  """
  patch = cfg.get("patch_size", 1)
  packed = cfg.get("in_channels", 64)
  out = cfg.get("out_channels") or packed
  if patch != 1 or packed % 4 or out != packed:
    raise ValueError(
      f"Unsupported {source} config: needs patch_size=1 (the 2 x 2 packing is the pipeline's), "
      f"in_channels divisible by 4 and out_channels = in_channels; got patch_size={patch}, "
      f"in_channels={packed}, out_channels={cfg.get('out_channels')}"
    )
  heads, head_dim = cfg.get("num_attention_heads", 24), cfg.get("attention_head_dim", 128)
  return dict(
    input_size=input_size,
    patch_size=2,
    in_channels=packed // 4,
    hidden_size=heads * head_dim,
    depth=cfg.get("num_layers", 19),
    single_depth=cfg.get("num_single_layers", 38),
    num_heads=heads,
    mlp_ratio=4.0,
    axes_dim=tuple(int(a) for a in cfg.get("axes_dims_rope", (16, 56, 56))),
    caption_channels=cfg.get("joint_attention_dim", 4096),
    caption_length=caption_length,
    pooled_channels=cfg.get("pooled_projection_dim", 768),
    null_caption="zeros",
    guidance_embedding=bool(cfg.get("guidance_embeds", False)),
    num_classes=0,
    learn_sigma=False,
  )


def diffusers_params(
  weights: Mapping[str, np.ndarray],
  cfg: Mapping[str, Any],
  source: str = "<state dict>",
  *,
  input_size: int = 128,
  caption_length: int = 512,
  progress: bool = False,
) -> tuple[dict, dict]:
  """diffusers FluxTransformer2DModel state dict + config -> (params, Flux kwargs).

  Every tensor is checked by name and shape first: a mismatch is a ValueError listing the
  first missing, unexpected and mis-shaped keys.
  """
  kwargs = diffusers_kwargs(cfg, source, input_size=input_size, caption_length=caption_length)
  model = build_model(kwargs)
  x, t, cond = model.example_inputs(1)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, cond))["params"]
  shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}
  rules = diffusers_rules(model)
  covered = {path for path, _, _ in rules}
  if covered != set(shapes):  # A bug in the rules, not in the checkpoint.
    raise AssertionError(f"rules do not cover the model: {sorted(set(shapes) ^ covered)}")
  expected = {name: shape for _, tensors, _ in rules for name, shape in tensors}
  hub_files.check_keys(weights, expected, source)
  flat = {}
  for path, tensors, kind in tqdm(rules, "convert", unit="tensor", disable=not progress):
    flat[path] = layouts.to_flax(kind, [np.asarray(weights[n], np.float32) for n, _ in tensors])
    if flat[path].shape != shapes[path]:
      raise AssertionError(f"{path}: converted {flat[path].shape}, model {shapes[path]}")
  return traverse_util.unflatten_dict(flat), kwargs
