"""Stable Diffusion 3's MMDiT: joint attention over image and text tokens, one set of weights
per stream.

Images come in NHWC and are cut into p x p patches (a linear layer, as DiT's x_embedder; SD3's
conv patch embedding is the same map), given SD3's fixed 2D sin-cos positions, and run with
the projected caption through `depth` joint blocks. A block modulates each stream with
adaLN-Zero from one vector c = timestep embedding + pooled text embedding, projects each
stream to queries, keys and values with its own weights, attends over the concatenation
[image tokens, text tokens] (diffusers' order), and gives each stream its own output
projection and GELU(tanh) MLP. The last block is "context pre-only": the text stream is only
normalised and modulated (scale, shift) to give keys and values; nothing of it comes out.
Then AdaLayerNormContinuous (scale, shift from c) and a linear layer, un-patchified to NHWC.

Choices of ours (docs/mmdit.md):
  pooled_channels > 0: cond["pooled"] (B, pooled_channels) is the pooled text vector (SD3:
    CLIP-L and CLIP-G pooled outputs, 2048 wide); it is required with a caption.
  pooled_channels = 0: the pooled vector is the mean of cond["text"] over its real tokens
    (text_mask), so a T5-only model needs no second encoder; the projection then reads
    caption_channels features.
  null caption (rows with cond["drop"], and calls without "text"): "learned" (a parameter
    y_embedding (caption_length, caption_channels), as PixArt) or "zeros" (SD3 zeroes its
    dropped text embeddings; converted checkpoints use it). A dropped row sees every null
    token as real and a zero pooled vector (pooled_channels > 0).
  attend_padding: SD3 attends to every text token, padding included (its T5/CLIP sequences
    have a fixed length); the default masks the padding out of the keys with text_mask.

Parameter names (dit/models/convert.py maps diffusers' SD3Transformer2DModel onto them):
x_embedder, t_embedder/mlp_{0,2}, pooled_embedder/linear_{1,2}, context_embedder,
blocks_{i}/{adaLN_modulation_1, context_adaLN_modulation_1, attn/{qkv, proj, context_qkv |
context_kv, context_proj, q_norm, k_norm, context_q_norm, context_k_norm}, mlp, context_mlp},
final_layer/{adaLN_modulation_1, linear}, y_embedding.

Shapes: B batch, N image tokens, L text tokens, D hidden size, Dh = D / num_heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from dit.models import repeat
from dit.models.attention import IMPLEMENTATIONS, dot_product_attention
from dit.models.blocks import BlockSettings, Modulation
from dit.models.layers import (
  Mlp,
  TimestepEmbedder,
  check_image_and_time,
  check_text,
  modulate,
  normal_02,
  plain_layer_norm,
  scale_shift_init,
  sincos_pos_embed_2d,
  xavier_uniform,
  zeros,
)

QK_NORMS = ("", "rms_norm", "layer_norm")
NULL_CAPTIONS = ("learned", "zeros")


def _qk_norm(kind: str, dtype: Any, name: str) -> nn.Module:
  """Per-head norm of queries or keys over Dh, eps 1e-6 (diffusers' Attention(eps=1e-6))."""
  if kind == "rms_norm":  # SD3.5: x / rms(x) * scale.
    return nn.RMSNorm(epsilon=1e-6, dtype=dtype, name=name)
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)


class JointAttention(nn.Module):
  """Attention over [image tokens, text tokens] with per-stream projections.

  context_pre_only: the text stream gives keys and values only (no queries, no output).
  """

  num_heads: int
  qk_norm: str = ""
  implementation: str = "xla"
  dtype: Any = jnp.float32
  context_pre_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, mask: jax.Array | None = None):
    """x: (B, N, D); y: (B, L, D); mask: (B, 1, 1, N + L) bool keys or None.

    Returns (B, N, D) and, unless context_pre_only, (B, L, D).
    """
    b, n, d = x.shape
    h = self.num_heads
    dense = lambda f, name: nn.Dense(f, kernel_init=xavier_uniform, dtype=self.dtype, name=name)
    q, k, v = jnp.split(dense(3 * d, "qkv")(x).reshape(b, n, 3 * h, d // h), 3, axis=2)
    if self.context_pre_only:
      ck, cv = jnp.split(dense(2 * d, "context_kv")(y).reshape(b, -1, 2 * h, d // h), 2, axis=2)
    else:
      cq, ck, cv = jnp.split(dense(3 * d, "context_qkv")(y).reshape(b, -1, 3 * h, d // h), 3, 2)
    if self.qk_norm:
      q = _qk_norm(self.qk_norm, self.dtype, "q_norm")(q)
      k = _qk_norm(self.qk_norm, self.dtype, "k_norm")(k)
      ck = _qk_norm(self.qk_norm, self.dtype, "context_k_norm")(ck)
      if not self.context_pre_only:
        cq = _qk_norm(self.qk_norm, self.dtype, "context_q_norm")(cq)
    if not self.context_pre_only:
      q = jnp.concatenate([q, cq], axis=1)
    k = jnp.concatenate([k, ck], axis=1)
    v = jnp.concatenate([v, cv], axis=1)
    out = dot_product_attention(q, k, v, mask, implementation=self.implementation)
    out = out.reshape(b, -1, d)
    x_out = dense(d, "proj")(out[:, :n])
    if self.context_pre_only:
      return x_out
    return x_out, dense(d, "context_proj")(out[:, n:])


class JointBlock(nn.Module):
  """SD3's JointTransformerBlock: (image, text) tokens -> (image, text) tokens.

  Each stream: adaLN-Zero (6 modulations from c, zero-initialised: a fresh block is the
  identity) around the joint attention and its own MLP. context_pre_only (the last block):
  the text stream is modulated by (scale, shift) only and the block returns the image tokens.
  """

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: str = ""
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  context_pre_only: bool = False

  @nn.compact
  def __call__(self, tokens, c: jax.Array, mask: jax.Array | None = None):
    """tokens: (x (B, N, D), y (B, L, D)); c: (B, D); mask: (B, 1, 1, N + L) or None."""
    x, y = tokens
    d, dtype = self.hidden_size, self.dtype
    modulation = lambda f, name: nn.Dense(f, kernel_init=zeros, dtype=dtype, name=name)
    m = Modulation.split6(modulation(6 * d, "adaLN_modulation_1")(nn.silu(c)))
    if self.context_pre_only:
      # diffusers' AdaLayerNormContinuous: scale first, then shift.
      scale, shift = jnp.split(modulation(2 * d, "context_adaLN_modulation_1")(nn.silu(c)), 2, -1)
      cm = None
      y_in = modulate(plain_layer_norm(dtype)(y), shift, scale)
    else:
      cm = Modulation.split6(modulation(6 * d, "context_adaLN_modulation_1")(nn.silu(c)))
      y_in = modulate(plain_layer_norm(dtype)(y), cm.shift_msa, cm.scale_msa)
    x_in = modulate(plain_layer_norm(dtype)(x), m.shift_msa, m.scale_msa)
    attn = JointAttention(
      self.num_heads, self.qk_norm, self.attention_impl, dtype, self.context_pre_only, name="attn"
    )
    out = attn(x_in, y_in, mask)
    x_attn, y_attn = (out, None) if self.context_pre_only else out
    hidden = int(d * self.mlp_ratio)
    x = x + m.gate_msa[:, None] * x_attn
    h = Mlp(hidden, d, dtype, name="mlp")(
      modulate(plain_layer_norm(dtype)(x), m.shift_mlp, m.scale_mlp)
    )
    x = x + m.gate_mlp[:, None] * h
    if self.context_pre_only:
      return x
    y = y + cm.gate_msa[:, None] * y_attn
    h = Mlp(hidden, d, dtype, name="context_mlp")(
      modulate(plain_layer_norm(dtype)(y), cm.shift_mlp, cm.scale_mlp)
    )
    return x, y + cm.gate_mlp[:, None] * h


class PooledEmbedder(nn.Module):
  """The pooled text vector's projection: Linear -> SiLU -> Linear, (B, K) -> (B, D)."""

  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    dense = lambda name: nn.Dense(
      self.hidden_size, kernel_init=normal_02, dtype=self.dtype, name=name
    )
    return dense("linear_2")(nn.silu(dense("linear_1")(pooled)))


class FinalLayer(nn.Module):
  """diffusers' AdaLayerNormContinuous (scale, then shift, from c) + a linear, (B, N, out)."""

  hidden_size: int
  out_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    dense = lambda f, name: nn.Dense(f, kernel_init=zeros, dtype=self.dtype, name=name)
    scale, shift = jnp.split(dense(2 * self.hidden_size, "adaLN_modulation_1")(nn.silu(c)), 2, -1)
    x = modulate(plain_layer_norm(self.dtype)(x), shift, scale)
    return dense(self.out_features, "linear")(x)


class MMDiT(nn.Module):
  """Stable Diffusion 3's multimodal diffusion transformer, text-conditioned.

  Attributes:
    input_size: training resolution H = W of x; with patch_size it sets the position grid's
      base size (diffusers' sample_size).
    patch_size: p; image tokens N = (H / p) * (W / p).
    in_channels: C of x.
    hidden_size, depth, num_heads, mlp_ratio: transformer size; depth counts the last,
      context-pre-only block.
    num_classes: always 0 (no class labels; the train and sample paths read it).
    learn_sigma: output 2 C channels (prediction, variance interpolation) instead of C.
    caption_channels: width of cond["text"] (diffusers' joint_attention_dim; 4096 for SD3's
      T5 + CLIP); must be > 0.
    caption_length: tokens of the null caption (the learned table's length).
    pooled_channels: width of cond["pooled"] (SD3: 2048); 0 = the masked mean of cond["text"].
    null_caption: "learned" (parameter y_embedding) or "zeros" (SD3's dropped text).
    attend_padding: attend to every text token, ignoring text_mask in the attention (SD3).
    pos_embed_max_size: SD3's position table side M (in patches): an M x M table of base size
      input_size / p, center-cropped to the image's grid (at most M x M). 0 = the table of
      the image's own grid (PixArt's, scaled to the same base size).
    pe_interpolation: diffusers' interpolation_scale (positions are divided by it).
    qk_norm: "" (none), "rms_norm" (SD3.5) or "layer_norm", per head on both streams.
    attention_impl: "xla" | "cudnn" | "einsum" (see attention.py).
    dtype: compute dtype; params stay float32, norms' statistics and the output float32.
    remat, remat_policy, scan: how the blocks run (dit/models/repeat.py); the params keep the
      per-block layout blocks_{i}. The last block runs on its own (rematerialised with remat).
    guidance_embedding: a consistency-distilled student: cond["guidance"] (B,) is embedded
      as a timestep of 1000 w and added to c (zero-initialised output), as DiT's.
  """

  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 24
  num_heads: int = 18
  mlp_ratio: float = 4.0
  num_classes: int = 0
  learn_sigma: bool = False
  caption_channels: int = 4096
  caption_length: int = 120
  pooled_channels: int = 0
  null_caption: str = "learned"
  attend_padding: bool = False
  pos_embed_max_size: int = 0
  pe_interpolation: float = 1.0
  qk_norm: str = ""
  attention_impl: str = "xla"
  dtype: Any = "float32"
  remat: bool = False
  remat_policy: str = ""
  scan: bool = False
  guidance_embedding: bool = False

  def __post_init__(self):
    self._check_fields()
    super().__post_init__()

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def size_conditioning(self) -> bool:
    return False  # No PixArt-alpha size micro-conditioning.

  def _check_fields(self):
    if self.caption_channels <= 0:
      raise ValueError(
        f"MMDiT needs a text input: caption_channels must be > 0 (the width of cond['text']), "
        f"got caption_channels={self.caption_channels}"
      )
    if self.num_classes != 0:
      raise ValueError(
        f"MMDiT takes no class labels: num_classes must be 0, got {self.num_classes}"
      )
    if self.depth < 1:
      raise ValueError(
        f"MMDiT needs depth >= 1 (the last block is context-pre-only), got {self.depth}"
      )
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
      )
    if self.hidden_size % 4:
      raise ValueError(
        f"hidden_size={self.hidden_size} must be divisible by 4 (2D sin-cos positions)"
      )
    for name, value, valid in (
      ("qk_norm", self.qk_norm, QK_NORMS),
      ("null_caption", self.null_caption, NULL_CAPTIONS),
      ("attention_impl", self.attention_impl, IMPLEMENTATIONS),
    ):
      if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
    if self.pooled_channels < 0 or self.caption_length < 1 or self.pos_embed_max_size < 0:
      raise ValueError(
        "need pooled_channels >= 0, caption_length >= 1 and pos_embed_max_size >= 0, got "
        f"{self.pooled_channels}, {self.caption_length} and {self.pos_embed_max_size}"
      )
    grid = self.input_size // self.patch_size
    if self.pos_embed_max_size and self.pos_embed_max_size < grid:
      raise ValueError(
        f"pos_embed_max_size={self.pos_embed_max_size} is smaller than the training grid "
        f"input_size / patch_size = {grid}"
      )
    if self.remat_policy not in repeat.REMAT_POLICIES:
      policies = sorted(name for name in repeat.REMAT_POLICIES if name)
      raise ValueError(f"remat_policy must be '' or one of {policies}, got {self.remat_policy!r}")
    if self.remat and self.remat_policy.startswith("offload") and not self.scan:
      raise ValueError(f"remat_policy={self.remat_policy!r} needs scan=True")

  def _check_inputs(self, x, t, cond):
    b = check_image_and_time(self, x, t)
    h, w, p = x.shape[1], x.shape[2], self.patch_size
    m = self.pos_embed_max_size
    if m and (h // p > m or w // p > m):
      raise ValueError(
        f"image grid (H / p, W / p) = ({h // p}, {w // p}) exceeds pos_embed_max_size={m}"
      )
    if "drop" in cond and jnp.shape(cond["drop"]) != (b,):
      raise ValueError(f"cond['drop'] must have shape ({b},), got {jnp.shape(cond['drop'])}")
    if self.guidance_embedding and jnp.shape(cond.get("guidance")) != (b,):
      raise ValueError(
        "guidance_embedding=True needs cond['guidance'] (the guidance scale) of shape "
        f"({b},), got {jnp.shape(cond['guidance']) if 'guidance' in cond else 'none'}"
      )
    check_text(cond, b, self.caption_channels)
    if "text" in cond:
      text = cond["text"]
      if self.null_caption == "learned" and text.shape[1] > self.caption_length:
        raise ValueError(
          f"cond['text'] has {text.shape[1]} tokens, more than caption_length="
          f"{self.caption_length} (the length of the null caption); truncate the text "
          "embeddings or raise caption_length"
        )
    k = self.pooled_channels
    if k and "text" in cond and "pooled" not in cond:
      raise ValueError(f"pooled_channels={k} needs cond['pooled'] of shape ({b}, {k})")
    if "pooled" in cond and (not k or jnp.shape(cond["pooled"]) != (b, k)):
      raise ValueError(
        f"cond['pooled'] must be (B, pooled_channels) = ({b}, {k}), got "
        f"{jnp.shape(cond['pooled'])}"
        + ("; with pooled_channels=0 the pooled vector is the text's mean" if not k else "")
      )

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping | None = None) -> jax.Array:
    """Predicts the model's target for noisy images x at times t.

    Args:
      x: (B, H, W, C) float.
      t: (B,) timesteps, float, in [0, 1000) (diffusers' SD3 timestep: the flow time
        times 1000, or a discrete timestep).
      cond: dict with "text" (B, L, caption_channels), "text_mask" (B, L) (1 = real token),
        "drop" (B,) bool (the null caption on these rows), "pooled" (B, pooled_channels)
        (with pooled_channels > 0), "guidance" (B,) (with guidance_embedding). Without
        "text" every row sees the null caption.

    Returns:
      (B, H, W, out_channels) float32.
    """
    cond = dict(cond or {})
    self._check_inputs(x, t, cond)
    dtype = jnp.dtype(self.dtype)
    b, h, w, _ = x.shape
    p, d = self.patch_size, self.hidden_size
    gh, gw = h // p, w // p

    patches = rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p).astype(dtype)
    tokens = nn.Dense(d, kernel_init=xavier_uniform, dtype=dtype, name="x_embedder")(patches)
    tokens = tokens + jnp.asarray(self._pos_embed(gh, gw), dtype)[None]

    drop = jnp.asarray(cond.get("drop", jnp.zeros((b,), bool)), bool)
    text, mask, pooled = self._text(cond, drop, b)
    c = TimestepEmbedder(d, dtype=dtype, name="t_embedder")(t)
    c = c + PooledEmbedder(d, dtype, name="pooled_embedder")(pooled.astype(dtype))
    if self.guidance_embedding:
      c = c + TimestepEmbedder(d, dtype=dtype, out_init=zeros, name="w_embedder")(
        1000.0 * jnp.asarray(cond["guidance"], jnp.float32)
      )
    context = nn.Dense(d, kernel_init=xavier_uniform, dtype=dtype, name="context_embedder")(
      text.astype(dtype)
    )
    # Keys: every image token, and the real text tokens unless SD3's attend_padding.
    keys = None
    if not self.attend_padding:
      keys = jnp.concatenate([jnp.ones((b, gh * gw), bool), mask], axis=1)[:, None, None]

    settings = BlockSettings(
      depth=self.depth - 1,
      hidden_size=d,
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      qk_norm=self.qk_norm,
      attention_impl=self.attention_impl,
      dtype=dtype,
      scan=self.scan,
      remat=self.remat,
      remat_policy=self.remat_policy,
    )
    tokens, context = repeat.repeat_blocks(JointBlock, settings, (tokens, context), c, keys)
    last = JointBlock
    if self.remat:
      last = nn.remat(JointBlock, policy=repeat.REMAT_POLICIES[self.remat_policy]())
    tokens = last(
      **settings.block_fields(), context_pre_only=True, name=f"blocks_{self.depth - 1}"
    )((tokens, context), c, keys)

    out = FinalLayer(d, p * p * self.out_channels, dtype, name="final_layer")(tokens, c)
    out = rearrange(out, "b (h w) (p q c) -> b (h p) (w q) c", h=gh, w=gw, p=p, q=p)
    return out.astype(jnp.float32)

  def _pos_embed(self, gh: int, gw: int) -> np.ndarray:
    """SD3's position table for a gh x gw grid, (gh * gw, D), raster order."""
    d, m = self.hidden_size, self.pos_embed_max_size
    base, scale = self.input_size // self.patch_size, self.pe_interpolation
    if not m:
      return sincos_pos_embed_2d(d, gh, gw, base_size=base, interpolation=scale)
    table = sincos_pos_embed_2d(d, m, m, base_size=base, interpolation=scale).reshape(m, m, d)
    top, left = (m - gh) // 2, (m - gw) // 2
    return table[top : top + gh, left : left + gw].reshape(gh * gw, d)

  def _text(self, cond, drop, b):
    """(text (B, L, caption_channels), mask (B, L) bool, pooled (B, pooled or caption
    channels)), dropped rows replaced by the null caption (all tokens real) and pooled 0."""
    cc, length = self.caption_channels, self.caption_length
    if self.null_caption == "learned":
      null = self.param("y_embedding", scale_shift_init, (length, cc))
    else:
      null = jnp.zeros((length, cc), jnp.float32)
    if "text" in cond:
      text = jnp.asarray(cond["text"], jnp.float32)
      mask = jnp.asarray(cond.get("text_mask", jnp.ones(text.shape[:2])), bool)
      n = text.shape[1]
      if n > length:  # Only with zeros (checked): zeros of any length.
        null = jnp.zeros((n, cc), jnp.float32)
      text = jnp.where(drop[:, None, None], null[None, :n], text)
      mask = mask | drop[:, None]
    else:
      text = jnp.broadcast_to(null[None], (b, length, cc))
      mask = jnp.ones((b, length), bool)
      drop = jnp.ones((b,), bool)
    if self.pooled_channels:
      pooled = jnp.asarray(cond.get("pooled", jnp.zeros((b, self.pooled_channels))), jnp.float32)
      pooled = jnp.where(drop[:, None], 0.0, pooled)
    else:
      weights = mask.astype(jnp.float32)[..., None]
      pooled = (text * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return text, mask, pooled

  def example_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array, dict]:
    """Zero inputs (x, t, cond) of the training shapes, for init, eval_shape, lowering."""
    b, s = batch_size, self.input_size
    cond = {
      "text": jnp.zeros((b, self.caption_length, self.caption_channels), jnp.float32),
      "text_mask": jnp.ones((b, self.caption_length), jnp.int32),
    }
    if self.pooled_channels:
      cond["pooled"] = jnp.zeros((b, self.pooled_channels), jnp.float32)
    if self.guidance_embedding:
      cond["guidance"] = jnp.ones((b,), jnp.float32)
    x = jnp.zeros((b, s, s, self.in_channels), jnp.float32)
    return x, jnp.zeros((b,), jnp.float32), cond


def build_model(kwargs: Mapping[str, Any]) -> MMDiT:
  """MMDiT(**kwargs) from config.model (without arch and class_dropout_prob); unknown keys
  are a ValueError listing the accepted fields."""
  fields = set(MMDiT.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
      f"Unknown config.model fields {unknown} for arch='mmdit'; MMDiT accepts "
      f"{sorted(fields)}, plus arch and class_dropout_prob"
    )
  return MMDiT(**dict(kwargs))
