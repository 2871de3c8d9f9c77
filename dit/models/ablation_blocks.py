"""DiT Figure 5's other ways for the condition to enter the blocks (ablations only).

  "adaln"       shift and scale regressed from c, no gates, default init (a fresh block is
                not the identity).
  "cross_attn"  plain pre-LayerNorm blocks; after the self-attention each block cross-attends
                to the 2-token sequence [timestep, label] embeddings.
  "in_context"  plain pre-LayerNorm blocks; the 2 condition tokens are appended to the image
                tokens and dropped before the final layer.

Class-conditional only: none of these takes a caption. The production blocks (adaLN-Zero,
adaLN-single) are in dit/models/blocks.py. The block options (norm, mlp, qk_norm, RoPE) work
here as there; the plain blocks' norms are affine (LayerNorm with scale and bias, or RMSNorm
with its scale). With RoPE, "in_context"'s condition tokens are not rotated (they have no
position). Shapes: B batch, N image tokens, D hidden size, M <= 2 condition tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit.models.attention import CrossAttention, SelfAttention
from dit.models.blocks import (
  AdaLNZeroFinalLayer,
  Block,
  BlockSettings,
  BlockType,
  Conditioning,
  FinalLayer,
  ModulatedBlock,
  Modulation,
)
from dit.models.layers import norm_layer, xavier_uniform, zeros
from dit.models.repeat import repeat_blocks


class AdaLNBlock(ModulatedBlock):
  """adaLN without gates: c (B, D) -> SiLU -> Linear (default init) -> 4 modulations."""

  @nn.compact
  def __call__(self, x, c, rope=None):
    """x: (B, N, D); c: (B, D); rope: (cos, sin) or None -> (B, N, D)."""
    mod = nn.Dense(
      4 * self.hidden_size, kernel_init=xavier_uniform, dtype=self.dtype, name="adaLN_modulation_1"
    )(nn.silu(c))
    shift_msa, scale_msa, shift_mlp, scale_mlp = jnp.split(mod, 4, axis=-1)
    m = Modulation(shift_msa, scale_msa, None, shift_mlp, scale_mlp, None)
    return self.transformer(x, m, rope=rope)


class AdaLNFinalLayer(AdaLNZeroFinalLayer):
  """adaLN (shift, scale from c (B, D), default init) then a zero-init linear, (B, N, out)."""

  modulation_init: Callable = xavier_uniform


class PlainBlock(Block):
  """Pre-LayerNorm ViT block without adaLN, (B, N, D) -> (B, N, D) ("in_context")."""

  def _norm(self, name: str) -> nn.Module:
    return norm_layer(self.norm, self.dtype, affine=True, name=name)

  def _attention(self, x: jax.Array, rope) -> jax.Array:
    attn = SelfAttention(self.num_heads, self.qk_norm, self.attention_impl, self.dtype, name="attn")
    return x + attn(self._norm("norm1")(x), rope=rope)

  def _mlp(self, x: jax.Array) -> jax.Array:
    return x + self.feed_forward()(self._norm("norm2")(x))

  @nn.compact
  def __call__(self, x, rope=None):
    """x: (B, N, D); rope: (cos, sin) (N, Dh) each, or None -> (B, N, D)."""
    return self._mlp(self._attention(x, rope))


class CrossAttnBlock(PlainBlock):
  """PlainBlock with a cross-attention to c (B, M, D) after the self-attention ("cross_attn")."""

  @nn.compact
  def __call__(self, x, c, rope=None):
    """x: (B, N, D); c: (B, M, D); rope: (cos, sin) or None -> (B, N, D)."""
    x = self._attention(x, rope)
    cross = CrossAttention(
      self.num_heads, self.qk_norm, self.attention_impl, self.dtype, name="cross_attn"
    )
    return self._mlp(x + cross(self._norm("norm_cross")(x), c))


class PlainFinalLayer(FinalLayer):
  """LayerNorm "norm_final" then a zero-init linear, (B, N, D) -> (B, N, out); c is unused."""

  @nn.compact
  def __call__(self, x, c):
    del c  # The condition reached the tokens through attention.
    x = norm_layer(self.norm, self.dtype, affine=True, name="norm_final")(x)
    return nn.Dense(self.out_features, kernel_init=zeros, dtype=self.dtype, name="linear")(x)


def adaln_stack(
  block_cls: type[nn.Module], settings: BlockSettings, tokens: jax.Array, cond: Conditioning
) -> jax.Array:
  """Every block modulated (ungated) by cond.vector; (B, N, D) -> (B, N, D)."""
  return repeat_blocks(
    block_cls, settings, tokens, cond.vector, cond.rope, **settings.block_options()
  )


def cross_attn_stack(
  block_cls: type[nn.Module], settings: BlockSettings, tokens: jax.Array, cond: Conditioning
) -> jax.Array:
  """Every block cross-attends to cond.tokens (B, M, D); (B, N, D) -> (B, N, D)."""
  return repeat_blocks(
    block_cls, settings, tokens, cond.tokens, cond.rope, **settings.block_options()
  )


def in_context_stack(
  block_cls: type[nn.Module], settings: BlockSettings, tokens: jax.Array, cond: Conditioning
) -> jax.Array:
  """cond.tokens (B, M, D) join the sequence for the blocks; (B, N, D) -> (B, N, D).

  With RoPE the condition tokens get the identity rotation (cos 1, sin 0).
  """
  n, m = tokens.shape[1], cond.tokens.shape[1]
  rope = cond.rope
  if rope is not None:
    cos, sin = rope
    rope = (jnp.pad(cos, ((0, m), (0, 0)), constant_values=1.0), jnp.pad(sin, ((0, m), (0, 0))))
  tokens = jnp.concatenate([tokens, cond.tokens], axis=1)
  tokens = repeat_blocks(block_cls, settings, tokens, rope, **settings.block_options())
  return tokens[:, :n]


ADALN = BlockType(AdaLNBlock, AdaLNFinalLayer, adaln_stack)
CROSS_ATTN = BlockType(CrossAttnBlock, PlainFinalLayer, cross_attn_stack)
IN_CONTEXT = BlockType(PlainBlock, PlainFinalLayer, in_context_stack)
