"""Diffusion transformers: DiT (adaLN-Zero, class labels) and PixArt-alpha (adaLN-single, T5 text).

One configurable Flax module, `DiT`. Images come in NHWC; they are cut into p x p patches,
embedded by a linear layer, given fixed 2D sin-cos position embeddings, run through `depth`
transformer blocks conditioned on the timestep (and a class label and/or a caption), and
un-patchified back to NHWC.

Parameter names follow the original DiT / PixArt code where that helps the converters
(dit/models/convert.py): x_embedder, t_embedder/mlp_0, y_embedder/embedding_table,
blocks_{i}/{attn,cross_attn,mlp,adaLN_modulation_1,scale_shift_table}, final_layer.
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
from einops import rearrange

from dit.models.attention import CrossAttention, SelfAttention

xavier_uniform = nn.initializers.xavier_uniform()
normal_02 = nn.initializers.normal(stddev=0.02)
zeros = nn.initializers.zeros

# How the condition enters the blocks (DiT Figure 5); see DiT.conditioning.
CONDITIONINGS = ("adaln_zero", "adaln", "cross_attn", "in_context")


# ----------------------------------------------------------------------------------------------
# Fixed embeddings.


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
  """x: (B, N, D); shift, scale: (B, D)."""
  return x * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------------------------
# Sub-modules.


class TimestepEmbedder(nn.Module):
  """256-d sinusoid -> Linear -> SiLU -> Linear, (B,) -> (B, hidden)."""

  hidden_size: int
  freq_dim: int = 256
  freq_shift: float = 0.0
  dtype: Any = jnp.float32
  out_init: Callable = normal_02

  @nn.compact
  def __call__(self, t):
    x = timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift)
    x = nn.Dense(self.hidden_size, kernel_init=normal_02, dtype=self.dtype, name="mlp_0")(x)
    x = nn.silu(x)
    return nn.Dense(self.hidden_size, kernel_init=self.out_init, dtype=self.dtype, name="mlp_2")(x)


class Mlp(nn.Module):
  """Linear -> GELU(tanh) -> Linear."""

  hidden_features: int
  out_features: int
  dtype: Any = jnp.float32
  kernel_init: Any = xavier_uniform

  @nn.compact
  def __call__(self, x):
    dense = partial(nn.Dense, kernel_init=self.kernel_init, dtype=self.dtype)
    x = nn.gelu(dense(self.hidden_features, name="fc1")(x), approximate=True)
    return dense(self.out_features, name="fc2")(x)


def _layer_norm(dtype):
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


def _scale_shift_init(key, shape, dtype=jnp.float32):
  # PixArt: torch.randn(n, D) / D ** 0.5.
  return jax.random.normal(key, shape, dtype) / math.sqrt(shape[-1])


class DiTBlock(nn.Module):
  """adaLN-Zero or adaLN-single transformer block with optional cross-attention.

  x: (B, N, D) tokens; c: (B, D) conditioning for adaLN-Zero, or (B, 6 D) output of the shared
  t_block for adaLN-single; y: optional (B, L, D) projected caption; y_mask: (B, L).
  """

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  adaln: str = "zero"
  cross_attn: bool = False
  qk_norm: bool = False
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  gated: bool = True  # False: DiT's plain "adaLN" ablation (shift/scale only, default init).

  @nn.compact
  def __call__(self, x, c, y=None, y_mask=None):
    d = self.hidden_size
    if self.adaln == "zero" and not self.gated:
      # DiT Figure 5 "adaLN": regress shift and scale only (gates fixed to 1), from a
      # default-initialised linear layer, so a fresh block is not the identity.
      mod = nn.Dense(
        4 * d, kernel_init=xavier_uniform, dtype=self.dtype, name="adaLN_modulation_1"
      )(nn.silu(c))
      shift_msa, scale_msa, shift_mlp, scale_mlp = jnp.split(mod, 4, axis=-1)
      gate_msa = gate_mlp = jnp.ones_like(shift_msa)
    elif self.adaln == "zero":
      mod = nn.Dense(6 * d, kernel_init=zeros, dtype=self.dtype, name="adaLN_modulation_1")(
        nn.silu(c)
      )
    else:
      table = self.param("scale_shift_table", _scale_shift_init, (6, d))
      mod = (table[None] + c.reshape(-1, 6, d)).reshape(-1, 6 * d).astype(self.dtype)
    if self.gated:
      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

    attn = SelfAttention(self.num_heads, self.qk_norm, self.attention_impl, self.dtype, name="attn")
    x = x + gate_msa[:, None] * attn(modulate(_layer_norm(self.dtype)(x), shift_msa, scale_msa))
    if self.cross_attn:
      # PixArt: no norm and no gate before the cross-attention.
      cross = CrossAttention(
        self.num_heads, self.qk_norm, self.attention_impl, self.dtype, name="cross_attn"
      )
      x = x + cross(x, y, y_mask)
    mlp = Mlp(int(d * self.mlp_ratio), d, self.dtype, name="mlp")
    x = x + gate_mlp[:, None] * mlp(modulate(_layer_norm(self.dtype)(x), shift_mlp, scale_mlp))
    return x


class PlainBlock(nn.Module):
  """Pre-LayerNorm ViT block without adaLN (DiT Figure 5's in-context and cross-attention).

  x: (B, N, D) tokens; c: (B, M, D) condition tokens that a cross-attention after the
  self-attention attends to, or None (in-context: the condition tokens are already in x).
  """

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c=None):
    d = self.hidden_size
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    attn = SelfAttention(self.num_heads, self.qk_norm, self.attention_impl, self.dtype, name="attn")
    x = x + attn(norm("norm1")(x))
    if c is not None:
      cross = CrossAttention(
        self.num_heads, self.qk_norm, self.attention_impl, self.dtype, name="cross_attn"
      )
      x = x + cross(norm("norm_cross")(x), c)
    mlp = Mlp(int(d * self.mlp_ratio), d, self.dtype, name="mlp")
    return x + mlp(norm("norm2")(x))


class FinalLayer(nn.Module):
  """adaLN (zero-init for "zero", scale_shift_table for "single") then a zero-init linear."""

  hidden_size: int
  out_features: int
  adaln: str = "zero"
  dtype: Any = jnp.float32
  conditioning: str = "adaln_zero"  # See DiT.conditioning.

  @nn.compact
  def __call__(self, x, c):
    d = self.hidden_size
    if self.conditioning in ("cross_attn", "in_context"):
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm_final")(x)
      return nn.Dense(self.out_features, kernel_init=zeros, dtype=self.dtype, name="linear")(x)
    if self.conditioning == "adaln":
      mod = nn.Dense(
        2 * d, kernel_init=xavier_uniform, dtype=self.dtype, name="adaLN_modulation_1"
      )(nn.silu(c))
      shift, scale = jnp.split(mod, 2, axis=-1)
    elif self.adaln == "zero":
      mod = nn.Dense(2 * d, kernel_init=zeros, dtype=self.dtype, name="adaLN_modulation_1")(
        nn.silu(c)
      )
      shift, scale = jnp.split(mod, 2, axis=-1)
    else:
      table = self.param("scale_shift_table", _scale_shift_init, (2, d))
      mod = (table[None] + c[:, None]).astype(self.dtype)
      shift, scale = mod[:, 0], mod[:, 1]
    x = modulate(_layer_norm(self.dtype)(x), shift, scale)
    return nn.Dense(self.out_features, kernel_init=zeros, dtype=self.dtype, name="linear")(x)


# ----------------------------------------------------------------------------------------------
# The model.


class DiT(nn.Module):
  """Diffusion transformer (DiT / PixArt-alpha).

  Attributes:
    input_size: training resolution H = W of x (pixels or latents); sets the position grid's
      base size. Other sizes divisible by patch_size also work (position embeddings are
      rescaled PixArt-style by pe_interpolation).
    patch_size: p; tokens = (H / p) * (W / p).
    in_channels: C of x.
    hidden_size, depth, num_heads, mlp_ratio: transformer size.
    num_classes: 0 = no class labels; otherwise the label table has num_classes + 1 rows, the
      last being the null (CFG) class.
    class_dropout_prob: probability of replacing the label and/or caption by the null one when
      train=True (rng stream "dropout").
    learn_sigma: output 2 C channels (prediction, variance interpolation v) instead of C.
    adaln: "zero" (per-block SiLU -> Linear -> 6 modulations, DiT) or "single" (one shared
      t_block, per-block learned scale_shift_table, PixArt-alpha).
    caption_channels: width of the text embeddings (4096 for T5-XXL); > 0 enables the caption
      projection and a cross-attention in every block.
    caption_length: number of tokens of the null caption used for CFG dropout.
    null_caption: "learned" (a parameter y_embedding, as PixArt) or "frozen" (a fixed random
      table, not a parameter).
    pe_interpolation: PixArt's position-embedding interpolation scale.
    time_freq_shift: 0 for the original DiT; 1 reproduces diffusers' DiT port.
    size_conditioning: PixArt-alpha 1024px micro-conditioning: cond["resolution"] (B, 2)
      (height, width in pixels) and cond["aspect_ratio"] (B, 1) are embedded and added to the
      timestep embedding (diffusers' `use_additional_conditions`).
    qk_norm: LayerNorm on queries and keys per head.
    attention_impl: "xla" | "cudnn" | "einsum" (see attention.py).
    dtype: compute dtype ("float32" | "bfloat16"); params stay float32; LayerNorm statistics
      and the output are float32. bf16 outputs agree with float32 to within 5% of the
      output's standard deviation (max abs; about 0.7% on average; tests/test_model.py).
    remat: rematerialise each block in the backward pass (nn.remat).
    conditioning: how the timestep + label embedding enters the blocks (DiT Figure 5):
      "adaln_zero" (the default: adaLN modulation with zero-initialised gates, or PixArt's
      adaLN-single with adaln="single"); "adaln" (shift and scale only, no gates, default
      init); "cross_attn" (timestep and label embeddings as a 2-token sequence that every
      block cross-attends to after its self-attention; plain LayerNorm); "in_context" (the
      2 embeddings appended to the image tokens and dropped before the final layer; plain
      LayerNorm). The variants other than "adaln_zero" need adaln="zero", caption_channels=0.
    guidance_embedding: a consistency-distilled (LCM) student: cond["guidance"] (B,), the
      classifier-free guidance scale w, is embedded as a timestep of 1000 w and added to the
      timestep embedding. The embedder's output layer starts at zero, so a student made from
      a teacher's params computes exactly the teacher at initialisation.
  """

  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  learn_sigma: bool = True
  adaln: str = "zero"
  caption_channels: int = 0
  caption_length: int = 120
  null_caption: str = "learned"
  pe_interpolation: float = 1.0
  time_freq_shift: float = 0.0
  size_conditioning: bool = False
  qk_norm: bool = False
  attention_impl: str = "xla"
  dtype: Any = "float32"
  remat: bool = False
  conditioning: str = "adaln_zero"
  guidance_embedding: bool = False

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  def _check_fields(self):
    if self.adaln not in ("zero", "single"):
      raise ValueError(f"adaln must be 'zero' or 'single', got {self.adaln!r}")
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
    if self.conditioning != "adaln_zero" and (self.adaln != "zero" or self.caption_channels):
      raise ValueError(
        f"conditioning={self.conditioning!r} needs adaln='zero' and caption_channels=0 "
        f"(class-conditional DiT), got adaln={self.adaln!r}, "
        f"caption_channels={self.caption_channels}"
      )
    if self.null_caption not in ("learned", "frozen"):
      raise ValueError(f"null_caption must be 'learned' or 'frozen', got {self.null_caption!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
      )

  def _check_inputs(self, x, t, cond):
    if x.ndim != 4:
      raise ValueError(f"x must be (B, H, W, C), got shape {x.shape}")
    b, h, w, c = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(
        f"image size (H, W) = ({h}, {w}) must be divisible by patch_size={p}; "
        f"expected multiples of {p} such as ({self.input_size}, {self.input_size})"
      )
    if c != self.in_channels:
      raise ValueError(
        f"x has {c} channels, expected in_channels={self.in_channels} (got shape {x.shape})"
      )
    if jnp.shape(t) != (b,):
      raise ValueError(f"t must have shape (B,) = ({b},), got {jnp.shape(t)}")
    if "label" in cond and jnp.shape(cond["label"]) != (b,):
      raise ValueError(f"cond['label'] must have shape ({b},), got {jnp.shape(cond['label'])}")
    if "drop" in cond and jnp.shape(cond["drop"]) != (b,):
      raise ValueError(f"cond['drop'] must have shape ({b},), got {jnp.shape(cond['drop'])}")
    if self.guidance_embedding and jnp.shape(cond.get("guidance")) != (b,):
      raise ValueError(
        "guidance_embedding=True needs cond['guidance'] (the guidance scale) of shape "
        f"({b},), got {jnp.shape(cond['guidance']) if 'guidance' in cond else 'none'}"
      )
    if "text" in cond:
      text = cond["text"]
      if text.ndim != 3 or text.shape[0] != b or text.shape[2] != self.caption_channels:
        raise ValueError(
          f"cond['text'] must be (B, L, caption_channels) = ({b}, L, {self.caption_channels}), "
          f"got {text.shape}"
        )
      if "text_mask" in cond and jnp.shape(cond["text_mask"]) != text.shape[:2]:
        raise ValueError(
          f"cond['text_mask'] must be (B, L) = {text.shape[:2]} to match cond['text'], "
          f"got {jnp.shape(cond['text_mask'])}"
        )

  @nn.compact
  def __call__(self, x, t, cond=None, *, train: bool = False):
    """Predicts noise (and variance) for noisy images x at timesteps t.

    Args:
      x: (B, H, W, C) float.
      t: (B,) timesteps, float or int, in [0, T).
      cond: optional dict with "label" (B,) int in [0, num_classes], "text" (B, L,
        caption_channels), "text_mask" (B, L) (1 = real token), "drop" (B,) bool (use the
        null condition on these rows), "guidance" (B,) float (with guidance_embedding).
      train: apply label/caption dropout with probability class_dropout_prob.

    Returns:
      (B, H, W, out_channels) float32.
    """
    self._check_fields()
    cond = dict(cond or {})
    self._check_inputs(x, t, cond)
    dtype = jnp.dtype(self.dtype)
    b, h, w, _ = x.shape
    p, d = self.patch_size, self.hidden_size
    gh, gw = h // p, w // p

    # Which rows use the null condition.
    drop = jnp.asarray(cond.get("drop", jnp.zeros((b,), bool)), bool)
    if train and self.class_dropout_prob > 0:
      rand = jax.random.uniform(self.make_rng("dropout"), (b,))
      drop = drop | (rand < self.class_dropout_prob)

    # Patch embedding (a linear layer on flattened p x p x C patches) + fixed position table.
    patches = rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p).astype(dtype)
    tokens = nn.Dense(d, kernel_init=xavier_uniform, dtype=dtype, name="x_embedder")(patches)
    base = self.input_size // p
    pos = sincos_pos_embed_2d(d, gh, gw, base_size=base, interpolation=self.pe_interpolation)
    tokens = tokens + jnp.asarray(pos, dtype)[None]

    # Conditioning vector: timestep (+ class label).
    c = t_emb = TimestepEmbedder(
      d, freq_shift=self.time_freq_shift, dtype=dtype, name="t_embedder"
    )(t)
    cond_tokens = []  # [timestep, label] for cross-attention / in-context conditioning.
    if self.num_classes > 0:
      labels = jnp.asarray(cond.get("label", jnp.full((b,), self.num_classes)), jnp.int32)
      labels = jnp.where(drop, self.num_classes, labels)
      table = nn.Embed(self.num_classes + 1, d, embedding_init=normal_02, name="y_embedder")
      y_emb = table(labels).astype(dtype)
      cond_tokens.append(y_emb)
      c = c + y_emb
    if self.size_conditioning:
      size = self._size_embedding(cond, b, dtype)
      c, t_emb = c + size, t_emb + size
    if self.guidance_embedding:
      w_emb = TimestepEmbedder(d, dtype=dtype, out_init=nn.initializers.zeros, name="w_embedder")(
        1000.0 * jnp.asarray(cond["guidance"], jnp.float32)
      )
      c, t_emb = c + w_emb, t_emb + w_emb
    cond_tokens.insert(0, t_emb)

    # Caption: replace dropped rows by the null caption, then project to the hidden size.
    y = y_mask = None
    if self.caption_channels > 0:
      y, y_mask = self._caption(cond, drop, b, dtype)

    if self.adaln == "single":
      block_c = nn.Dense(6 * d, kernel_init=normal_02, dtype=dtype, name="t_block_1")(nn.silu(c))
    else:
      block_c = c

    if self.conditioning in ("cross_attn", "in_context"):
      tokens = self._plain_blocks(tokens, jnp.stack(cond_tokens, axis=1), dtype)
    else:
      tokens = self._adaln_blocks(tokens, block_c, y, y_mask, dtype)

    out = FinalLayer(
      d, p * p * self.out_channels, self.adaln, dtype, self.conditioning, name="final_layer"
    )(tokens, c)
    out = rearrange(out, "b (h w) (p q c) -> b (h p) (w q) c", h=gh, w=gw, p=p, q=p)
    return out.astype(jnp.float32)

  def _adaln_blocks(self, tokens, block_c, y, y_mask, dtype):
    d = self.hidden_size
    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    for i in range(self.depth):
      tokens = block_cls(
        hidden_size=d,
        num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio,
        adaln=self.adaln,
        cross_attn=self.caption_channels > 0,
        qk_norm=self.qk_norm,
        attention_impl=self.attention_impl,
        dtype=dtype,
        gated=self.conditioning == "adaln_zero",
        name=f"blocks_{i}",
      )(tokens, block_c, y, y_mask)
    return tokens

  def _plain_blocks(self, tokens, cond_tokens, dtype):
    """Blocks conditioned on cond_tokens (B, M, D), [timestep, label] embeddings, M <= 2."""
    n = tokens.shape[1]
    if self.conditioning == "in_context":
      tokens = jnp.concatenate([tokens, cond_tokens], axis=1)
    block_cls = nn.remat(PlainBlock) if self.remat else PlainBlock
    for i in range(self.depth):
      tokens = block_cls(
        hidden_size=self.hidden_size,
        num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio,
        qk_norm=self.qk_norm,
        attention_impl=self.attention_impl,
        dtype=dtype,
        name=f"blocks_{i}",
      )(tokens, cond_tokens if self.conditioning == "cross_attn" else None)
    return tokens[:, :n]

  def _size_embedding(self, cond, b, dtype):
    """PixArt-alpha: (B, 2) resolution and (B, 1) aspect ratio -> (B, D), each scalar embedded."""
    d = self.hidden_size
    if d % 3:
      raise ValueError(f"size_conditioning needs hidden_size divisible by 3, got {d}")
    embs = []
    for key, n in (("resolution", 2), ("aspect_ratio", 1)):
      if key not in cond:
        raise ValueError(f"size_conditioning=True needs cond[{key!r}] of shape ({b}, {n})")
      value = jnp.asarray(cond[key], jnp.float32)
      if value.shape != (b, n):
        raise ValueError(f"cond[{key!r}] must have shape ({b}, {n}), got {value.shape}")
      emb = TimestepEmbedder(d // 3, dtype=dtype, name=f"{key}_embedder")(value.reshape(-1))
      embs.append(emb.reshape(b, n * (d // 3)))
    return jnp.concatenate(embs, axis=-1)

  def _caption(self, cond, drop, b, dtype):
    """Returns the projected caption (B, L, D) and its boolean mask (B, L)."""
    cc, length = self.caption_channels, self.caption_length
    if self.null_caption == "learned":
      null = self.param("y_embedding", _scale_shift_init, (length, cc))
    else:
      null = _scale_shift_init(jax.random.key(0), (length, cc))
    if "text" in cond:
      text = jnp.asarray(cond["text"], jnp.float32)
      mask = jnp.asarray(cond.get("text_mask", jnp.ones(text.shape[:2])), bool)
      if text.shape[1] > length:
        raise ValueError(
          f"cond['text'] has {text.shape[1]} tokens, more than caption_length={length} (the "
          f"length of the null caption); truncate the text embeddings or raise caption_length"
        )
      null = null[: text.shape[1]]
      text = jnp.where(drop[:, None, None], null[None], text)
    else:
      text = jnp.broadcast_to(null[None], (b, length, cc))
      mask = jnp.ones((b, length), bool)
    proj = Mlp(self.hidden_size, self.hidden_size, dtype, kernel_init=normal_02, name="y_proj")
    return proj(text.astype(dtype)), mask


def example_inputs(model: DiT, batch_size: int = 1) -> tuple[jax.Array, jax.Array, dict]:
  """Zero inputs (x, t, cond) of the model's training shapes, for init, eval_shape, lowering."""
  b, s = batch_size, model.input_size
  x = jnp.zeros((b, s, s, model.in_channels), jnp.float32)
  t = jnp.zeros((b,), jnp.float32)
  cond = {}
  if model.num_classes > 0:
    cond["label"] = jnp.zeros((b,), jnp.int32)
  if model.caption_channels > 0:
    cond["text"] = jnp.zeros((b, model.caption_length, model.caption_channels), jnp.float32)
    cond["text_mask"] = jnp.ones((b, model.caption_length), jnp.int32)
  if model.size_conditioning:
    cond["resolution"] = jnp.zeros((b, 2), jnp.float32)
    cond["aspect_ratio"] = jnp.zeros((b, 1), jnp.float32)
  if model.guidance_embedding:
    cond["guidance"] = jnp.ones((b,), jnp.float32)
  return x, t, cond


def abstract_params(model: DiT) -> dict:
  """The param pytree as jax.ShapeDtypeStruct leaves (nothing is allocated)."""
  x, t, cond = example_inputs(model)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, cond))["params"]


def build_model(model_config) -> DiT:
  """Builds a DiT from `config.model` (a ConfigDict or dict); unknown keys are an error."""
  kwargs = dict(model_config)
  fields = set(DiT.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"Unknown config.model fields {unknown}; DiT accepts {sorted(fields)}")
  return DiT(**kwargs)
