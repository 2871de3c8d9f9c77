"""Diffusion transformers: DiT (adaLN-Zero, class labels) and PixArt-alpha (adaLN-single, T5 text).

One configurable Flax module, `DiT`, assembled from parts: images come in NHWC; they are cut
into p x p patches, embedded by a linear layer, given fixed 2D sin-cos position embeddings
(and/or 2D rotary positions in every self-attention), run through `depth` transformer blocks
conditioned on the timestep (and a class label and/or a caption), and un-patchified back to
NHWC.

How the conditioning enters the blocks is `DiT.block`, a name in `BLOCKS`. A block type is a
module (dit/models/blocks.py, dit/models/ablation_blocks.py) plus one entry here. What is inside
every block is the block options, fields combinable with any block type: norm, mlp, qk_norm,
pos_embed (LightningDiT: rmsnorm, swiglu, rope; see docs/architecture.md).

Parameter names follow the original DiT / PixArt code where that helps the converters
(dit/models/convert.py): x_embedder, t_embedder/mlp_0, y_embedder/embedding_table,
blocks_{i}/{attn,cross_attn,mlp,adaLN_modulation_1,scale_shift_table}, final_layer.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from dit.models import ablation_blocks, blocks, repeat
from dit.models.attention import qk_norm_kind
from dit.models.blocks import BlockSettings, BlockType, Conditioning
from dit.models.layers import (
  MLPS,
  NORMS,
  Mlp,
  TimestepEmbedder,
  check_image_and_time,
  check_text,
  normal_02,
  scale_shift_init,
  sincos_pos_embed_2d,
  swiglu_hidden,
  xavier_uniform,
)
from dit.models.rope import axial_dims, grid_positions, rope_angles

# The block types: config.model.block -> BlockType (block class, final layer, stack).
BLOCKS: dict[str, BlockType] = {
  "adaln_zero": blocks.ADALN_ZERO,  # DiT.
  "adaln_single": blocks.ADALN_SINGLE,  # PixArt-alpha.
  # DiT Figure 5 ablations, class-conditional only.
  "adaln": ablation_blocks.ADALN,
  "cross_attn": ablation_blocks.CROSS_ATTN,
  "in_context": ablation_blocks.IN_CONTEXT,
}

# config.model.arch -> the module that builds that architecture from the rest of config.model,
# with `build_model(kwargs) -> nn.Module`; the module's model class has `example_inputs(b)`.
# "dit" (DiT, PixArt and the DiT-paper ablations) is this file.
ARCHS = {"dit": __name__, "mmdit": "dit.models.mmdit", "flux": "dit.models.flux"}

# DiT.pos_embed: the absolute sin-cos table added to the patch embeddings, 2D axial RoPE in
# every self-attention, or both (LightningDiT).
POS_EMBEDS = ("sincos", "rope", "both")

# config.model keys that are training settings, read by the train loop's objective (the
# label/caption dropout probability), not DiT fields; build_model ignores them.
TRAINING_KEYS = ("class_dropout_prob",)

# config.json files written before `block` existed: (adaln, conditioning) -> block.
# The Figure-5 variants needed adaln="zero" and kept their names.
LEGACY_BLOCKS = {("zero", c): c for c in ("adaln_zero", "adaln", "cross_attn", "in_context")}
LEGACY_BLOCKS[("single", "adaln_zero")] = "adaln_single"


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
    learn_sigma: output 2 C channels (prediction, variance interpolation v) instead of C.
    block: how the conditioning enters the blocks, a name in BLOCKS:
      "adaln_zero" (DiT: per-block SiLU -> Linear -> 6 modulations, zero-initialised gates);
      "adaln_single" (PixArt-alpha: one shared t_block, per-block learned scale_shift_table);
      both cross-attend to the caption when caption_channels > 0. DiT Figure 5's ablations,
      class-conditional only: "adaln" (shift and scale only, no gates, default init);
      "cross_attn" (timestep and label embeddings as a 2-token sequence that every block
      cross-attends to after its self-attention; plain LayerNorm); "in_context" (the 2
      embeddings appended to the image tokens and dropped before the final layer).
    caption_channels: width of the text embeddings (4096 for T5-XXL); > 0 enables the caption
      projection and a cross-attention in every block.
    caption_length: number of tokens of the null caption (the dropped / unconditional one).
    null_caption: "learned" (a parameter y_embedding, as PixArt) or "frozen" (a fixed random
      table, not a parameter).
    pe_interpolation: PixArt's position-embedding interpolation scale.
    time_freq_shift: 0 for the original DiT; 1 reproduces diffusers' DiT port.
    size_conditioning: PixArt-alpha 1024px micro-conditioning: cond["resolution"] (B, 2)
      (height, width in pixels) and cond["aspect_ratio"] (B, 1) are embedded and added to the
      timestep embedding (diffusers' `use_additional_conditions`).
    norm: the blocks' pre-attention and pre-MLP norms, a name in layers.NORMS: "layernorm"
      (plain, no scale or bias, eps 1e-6; in the plain "in_context" / "cross_attn" blocks with
      scale and bias) or "rmsnorm" (eps 1e-6, a learnable scale; LightningDiT). The final
      layer's norm follows it, as in LightningDiT. Captions' projection is unchanged.
    mlp: the blocks' feed-forward, a name in layers.MLPS: "gelu" (Linear -> GELU(tanh) ->
      Linear, hidden mlp_ratio D) or "swiglu" (SwiGLU, hidden int(2/3 int(mlp_ratio D)), not
      rounded, as LightningDiT: about the same params and MACs).
    pos_embed: a name in POS_EMBEDS: "sincos" (the fixed table added to the patch embeddings),
      "rope" (2D axial rotary positions on the queries and keys of every self-attention over
      the image tokens, no table; half of each head's channels rotate with the row, half with
      the column, as LightningDiT) or "both" (LightningDiT). RoPE positions are the table's:
      along each axis arange(n) * (input_size / p) / n / pe_interpolation, so any grid spans
      the positions of the training grid (PixArt's base_size scaling; LightningDiT's RoPE
      interpolates the same way). Sampling at another resolution or aspect ratio then rotates
      by angles seen in training (only their spacing changes) instead of extrapolating to
      unseen ones, and "both" keeps the table and the rotation at the same positions.
      Cross-attention keys (captions, condition tokens) and "in_context"'s appended
      condition tokens are not rotated.
    rope_theta: RoPE's base period (frequencies theta ** (-2 i / (Dh / 2)) per axis).
    qk_norm: norm of queries and keys per head over the head dimension: "" (none),
      "layernorm" (scale and bias) or "rmsnorm" (a scale); in self- and cross-attention.
      Configs written when it was a bool load: False = "", True = "layernorm".
    attention_impl: "xla" | "cudnn" | "einsum" (see attention.py).
    dtype: compute dtype ("float32" | "bfloat16"); params stay float32; LayerNorm statistics
      and the output are float32. bf16 outputs agree with float32 to within 5% of the
      output's standard deviation (max abs; about 0.7% on average; tests/test_model.py).
    remat: rematerialise each block in the backward pass: only a block's input (and what
      remat_policy keeps) is saved for it, its forward is recomputed in the backward pass.
    remat_policy: with remat (ignored without), what else is kept: "" (nothing) or a name in
      repeat.REMAT_POLICIES, e.g. "dots_with_no_batch_dims_saveable" (the matmul outputs) or
      "offload_dot_with_no_batch_dims" (the same, moved to host memory; needs scan).
    scan: run the depth blocks as one lax.scan over their stacked params (one block traced
      and compiled, instead of depth); params blocks_{i} or stacked, blocks (repeat.py).
    guidance_embedding: a consistency-distilled (LCM) student: cond["guidance"] (B,), the
      classifier-free guidance scale w, is embedded as a timestep of 1000 w and added to the
      timestep embedding. The embedder's output layer starts at zero, so a student made from
      a teacher's params computes exactly the teacher at initialisation.
    repa_block, repa_hidden, repa_dim: REPA (Yu et al. 2024; dit/objectives/repa.py). With
      repa_block = k > 0, the tokens after block k (1-based; the image tokens) go through a
      projector MLP, Linear(D, repa_hidden) -> SiLU -> Linear(repa_hidden, repa_hidden) ->
      SiLU -> Linear(repa_hidden, repa_dim), whose (B, N, repa_dim) float32 output is sown as
      intermediates["repa"]: computed only when the caller asks (apply with
      mutable=["intermediates"], the training step), so sampling skips it. repa_dim is the
      encoder's feature width. 0 disables.

  Label / caption dropout is the caller's: rows with cond["drop"] use the null class and the
  null caption (the train loop draws them with config.model.class_dropout_prob).
  """

  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  learn_sigma: bool = True
  block: str = "adaln_zero"
  caption_channels: int = 0
  caption_length: int = 120
  null_caption: str = "learned"
  pe_interpolation: float = 1.0
  time_freq_shift: float = 0.0
  size_conditioning: bool = False
  norm: str = "layernorm"
  mlp: str = "gelu"
  pos_embed: str = "sincos"
  rope_theta: float = 10000.0
  qk_norm: str | bool = ""
  attention_impl: str = "xla"
  dtype: Any = "float32"
  remat: bool = False
  remat_policy: str = ""
  scan: bool = False
  guidance_embedding: bool = False
  repa_block: int = 0
  repa_hidden: int = 2048
  repa_dim: int = 0

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def _check_fields(self):
    """Raises ValueError naming the fields of a setting that cannot be built."""
    if self.block not in BLOCKS:
      raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {self.block!r}")
    if self.caption_channels > 0 and not BLOCKS[self.block].captions:
      with_captions = sorted(name for name, entry in BLOCKS.items() if entry.captions)
      raise ValueError(
        f"block={self.block!r} takes no caption (class-conditional DiT only), but "
        f"caption_channels={self.caption_channels}; text models need one of {with_captions}"
      )
    if self.null_caption not in ("learned", "frozen"):
      raise ValueError(f"null_caption must be 'learned' or 'frozen', got {self.null_caption!r}")
    if self.remat_policy not in repeat.REMAT_POLICIES:
      policies = sorted(name for name in repeat.REMAT_POLICIES if name)
      raise ValueError(f"remat_policy must be '' or one of {policies}, got {self.remat_policy!r}")
    if self.remat and self.remat_policy.startswith("offload") and not self.scan:
      # Unrolled, the recomputation is ordered by arithmetic on the kept values (see
      # repeat.remat_in_order), which would then run on host memory.
      raise ValueError(f"remat_policy={self.remat_policy!r} needs scan=True")
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
      )
    self._check_block_options()
    if self.repa_block:
      if not 1 <= self.repa_block <= self.depth:
        raise ValueError(
          f"repa_block={self.repa_block} is not a block of this model: expected 1..{self.depth} "
          f"(depth={self.depth}; the hidden state after that block is aligned), or 0 for none"
        )
      for field in ("repa_hidden", "repa_dim"):
        if getattr(self, field) < 1:
          raise ValueError(
            f"{field}={getattr(self, field)} must be >= 1 with repa_block={self.repa_block} "
            f"(repa_dim: the encoder's feature width)"
          )

  def _check_block_options(self):
    for field, valid in (("norm", NORMS), ("mlp", MLPS), ("pos_embed", POS_EMBEDS)):
      if getattr(self, field) not in valid:
        raise ValueError(f"{field} must be one of {valid}, got {getattr(self, field)!r}")
    qk_norm_kind(self.qk_norm)
    d, ratio = self.hidden_size, self.mlp_ratio
    hidden = swiglu_hidden(d, ratio) if self.mlp == "swiglu" else int(d * ratio)
    if hidden < 1:
      raise ValueError(
        f"mlp={self.mlp!r} with mlp_ratio={self.mlp_ratio} and hidden_size={self.hidden_size} "
        f"gives an MLP without hidden units; raise mlp_ratio"
      )
    if self.pos_embed != "rope" and self.hidden_size % 4:
      raise ValueError(
        f"pos_embed={self.pos_embed!r} adds the 2D sin-cos table, which needs hidden_size "
        f"divisible by 4, got {self.hidden_size}; use pos_embed='rope' or another hidden_size"
      )
    if self.pos_embed != "sincos":
      if self.head_dim % 4:
        raise ValueError(
          f"pos_embed={self.pos_embed!r} (2D axial RoPE) needs the head dimension hidden_size "
          f"/ num_heads = {self.hidden_size} / {self.num_heads} = {self.head_dim} divisible by "
          f"4 (half of it per axis, rotated in pairs)"
        )
      if not self.rope_theta > 0:
        raise ValueError(
          f"rope_theta must be > 0 with pos_embed={self.pos_embed!r}, got {self.rope_theta}"
        )

  def _check_inputs(self, x, t, cond):
    b = check_image_and_time(self, x, t)
    if "label" in cond and jnp.shape(cond["label"]) != (b,):
      raise ValueError(f"cond['label'] must have shape ({b},), got {jnp.shape(cond['label'])}")
    if "drop" in cond and jnp.shape(cond["drop"]) != (b,):
      raise ValueError(f"cond['drop'] must have shape ({b},), got {jnp.shape(cond['drop'])}")
    if self.guidance_embedding and jnp.shape(cond.get("guidance")) != (b,):
      raise ValueError(
        "guidance_embedding=True needs cond['guidance'] (the guidance scale) of shape "
        f"({b},), got {jnp.shape(cond['guidance']) if 'guidance' in cond else 'none'}"
      )
    check_text(cond, b, self.caption_channels)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping | None = None) -> jax.Array:
    """Predicts noise (and variance) for noisy images x at timesteps t.

    Args:
      x: (B, H, W, C) float.
      t: (B,) timesteps, float or int, in [0, T).
      cond: optional dict with "label" (B,) int in [0, num_classes], "text" (B, L,
        caption_channels), "text_mask" (B, L) (1 = real token), "drop" (B,) bool (use the
        null label and caption on these rows), "guidance" (B,) float (with
        guidance_embedding), "resolution" (B, 2) and "aspect_ratio" (B, 1) (with
        size_conditioning).

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

    # Patch embedding (a linear layer on flattened p x p x C patches) + fixed position table.
    patches = rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p).astype(dtype)
    tokens = nn.Dense(d, kernel_init=xavier_uniform, dtype=dtype, name="x_embedder")(patches)
    base = self.input_size // p
    if self.pos_embed in ("sincos", "both"):
      pos = sincos_pos_embed_2d(d, gh, gw, base_size=base, interpolation=self.pe_interpolation)
      tokens = tokens + jnp.asarray(pos, dtype)[None]

    conditioning = self._conditioning(t, cond, b, dtype)
    if self.pos_embed in ("rope", "both"):
      conditioning = conditioning._replace(rope=self.rope_cos_sin(gh, gw))
    entry = BLOCKS[self.block]
    settings = self._block_settings(dtype)
    if self.repa_block:
      with repeat.capturing(self.repa_block) as captured:
        tokens = entry.stack(entry.block, settings, tokens, conditioning)
      self._repa(captured["tokens"][:, : gh * gw], dtype)  # in_context appends its tokens.
    else:
      tokens = entry.stack(entry.block, settings, tokens, conditioning)

    final = entry.final_layer(
      d, p * p * self.out_channels, dtype, norm=self.norm, name="final_layer"
    )
    out = final(tokens, conditioning.vector)
    out = rearrange(out, "b (h w) (p q c) -> b (h p) (w q) c", h=gh, w=gw, p=p, q=p)
    return out.astype(jnp.float32)

  def _repa(self, hidden: jax.Array, dtype) -> None:
    """Sows the REPA projection (B, N, repa_dim) of hidden (B, N, D), when it is asked for."""
    initializing = self.is_initializing()
    if not (initializing or self.is_mutable_collection("intermediates")):
      return
    z = hidden
    for i, width in enumerate((self.repa_hidden, self.repa_hidden, self.repa_dim)):
      if i:
        z = nn.silu(z)
      z = nn.Dense(width, kernel_init=xavier_uniform, dtype=dtype, name=f"repa_projector_{i}")(z)
    if not initializing:  # init returns params only, as without REPA.
      self.sow("intermediates", "repa", z.astype(jnp.float32))

  def rope_cos_sin(self, grid_h: int, grid_w: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each (grid_h * grid_w, head_dim) float32: 2D axial RoPE of a token grid.

    Positions (row, column) are the sin-cos table's, arange(n) * base / n / pe_interpolation
    per axis with base = input_size / patch_size (see the class docstring); the first half of
    each head's channels rotates with the row, the second with the column.
    """
    base = self.input_size // self.patch_size
    scale = np.array([base / grid_h, base / grid_w]) / self.pe_interpolation
    positions = grid_positions(grid_h, grid_w) * scale
    return rope_angles(positions, axial_dims(self.head_dim), self.rope_theta)

  def _block_settings(self, dtype) -> BlockSettings:
    # The settings are this model's fields of the same names, with the compute dtype.
    names = [f.name for f in dataclasses.fields(BlockSettings) if f.name != "dtype"]
    settings = {name: getattr(self, name) for name in names}
    return BlockSettings(**settings | {"qk_norm": qk_norm_kind(self.qk_norm)}, dtype=dtype)

  def _conditioning(self, t, cond, b, dtype) -> Conditioning:
    """Embeds timestep, label, size, guidance and caption; dropped rows get the null ones."""
    d = self.hidden_size
    drop = jnp.asarray(cond.get("drop", jnp.zeros((b,), bool)), bool)
    # The vector c sums every embedding; t_emb leaves out the label, which is a token of its
    # own for the token-conditioned blocks.
    c = t_emb = TimestepEmbedder(
      d, freq_shift=self.time_freq_shift, dtype=dtype, name="t_embedder"
    )(t)
    label_tokens = []
    if self.num_classes > 0:
      labels = jnp.asarray(cond.get("label", jnp.full((b,), self.num_classes)), jnp.int32)
      labels = jnp.where(drop, self.num_classes, labels)
      table = nn.Embed(self.num_classes + 1, d, embedding_init=normal_02, name="y_embedder")
      y_emb = table(labels).astype(dtype)
      label_tokens.append(y_emb)
      c = c + y_emb
    if self.size_conditioning:
      size = self._size_embedding(cond, b, dtype)
      c, t_emb = c + size, t_emb + size
    if self.guidance_embedding:
      w_emb = TimestepEmbedder(d, dtype=dtype, out_init=nn.initializers.zeros, name="w_embedder")(
        1000.0 * jnp.asarray(cond["guidance"], jnp.float32)
      )
      c, t_emb = c + w_emb, t_emb + w_emb
    caption = caption_mask = None
    if self.caption_channels > 0:
      caption, caption_mask = self._caption(cond, drop, b, dtype)
    return Conditioning(c, jnp.stack([t_emb, *label_tokens], axis=1), caption, caption_mask)

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
      null = self.param("y_embedding", scale_shift_init, (length, cc))
    else:
      null = scale_shift_init(jax.random.key(0), (length, cc))
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
  """Zero inputs (x, t, cond) of the model's training shapes, for init, eval_shape, lowering.

  x: (B, S, S, C), t: (B,); cond holds every key the model's fields call for: "label" (B,),
  "text" (B, caption_length, caption_channels) and "text_mask", "resolution" (B, 2) and
  "aspect_ratio" (B, 1), "guidance" (B,).
  """
  if not isinstance(model, DiT):
    return model.example_inputs(batch_size)
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


def legacy_block(adaln: str = "zero", conditioning: str = "adaln_zero") -> str:
  """The `block` of a config written before it existed, from its adaln and conditioning."""
  if adaln not in ("zero", "single"):
    raise ValueError(f"adaln must be 'zero' or 'single', got {adaln!r}")
  conditionings = sorted({c for _, c in LEGACY_BLOCKS})
  if conditioning not in conditionings:
    raise ValueError(f"conditioning must be one of {conditionings}, got {conditioning!r}")
  if (adaln, conditioning) not in LEGACY_BLOCKS:
    raise ValueError(
      f"conditioning={conditioning!r} needs adaln='zero' (class-conditional DiT), got "
      f"adaln={adaln!r}"
    )
  return LEGACY_BLOCKS[adaln, conditioning]


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
  """Builds the model of `config.model` (a ConfigDict or dict); unknown keys are an error.

  config.model.arch (default "dit") names the architecture, a key of ARCHS. For DiT, also
  reads model sections written before `block` existed (keys adaln, conditioning). Ignores
  TRAINING_KEYS (class_dropout_prob, the train loop's).
  """
  kwargs = {k: v for k, v in dict(model_config).items() if k not in TRAINING_KEYS}
  arch = kwargs.pop("arch", "dit")
  if arch not in ARCHS:
    raise ValueError(f"config.model.arch must be one of {sorted(ARCHS)}, got {arch!r}")
  if arch != "dit":
    return importlib.import_module(ARCHS[arch]).build_model(kwargs)
  if "adaln" in kwargs or "conditioning" in kwargs:
    block = legacy_block(kwargs.pop("adaln", "zero"), kwargs.pop("conditioning", "adaln_zero"))
    if kwargs.setdefault("block", block) != block:
      raise ValueError(
        f"config.model.block={kwargs['block']!r} contradicts the older keys adaln and "
        f"conditioning (which mean block={block!r}); keep only block"
      )
  fields = set(DiT.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
      f"Unknown config.model fields {unknown}; DiT accepts {sorted(fields)}, plus "
      f"{list(TRAINING_KEYS)} (read by the train loop) and the older adaln, conditioning"
    )
  model = DiT(**kwargs)
  model._check_fields()  # A setting that cannot be built fails here, not at the first call.
  return model
