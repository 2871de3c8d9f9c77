"""DiT Figure 5's other ways for the condition to enter the blocks (ablations only).

  "adaln"       shift and scale regressed from c, no gates, default init (a fresh block is
                not the identity).
  "cross_attn"  plain pre-LayerNorm blocks; after the self-attention each block cross-attends
                to the 2-token sequence [timestep, label] embeddings.
  "in_context"  plain pre-LayerNorm blocks; the 2 condition tokens are appended to the image
                tokens and dropped before the final layer.

Class-conditional only: none of these takes a caption. The production blocks (adaLN-Zero,
adaLN-single) are in dit/models/blocks.py. Shapes: B batch, N image tokens, D hidden size,
M <= 2 condition tokens.
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
from dit.models.layers import Mlp, xavier_uniform, zeros
from dit.models.repeat import repeat_blocks


class AdaLNBlock(ModulatedBlock):
  """adaLN without gates: c (B, D) -> SiLU -> Linear (default init) -> 4 modulations."""

  @nn.compact
  def __call__(self, x, c):
    """x: (B, N, D); c: (B, D) -> (B, N, D)."""
    mod = nn.Dense(
      4 * self.hidden_size, kernel_init=xavier_uniform, dtype=self.dtype, name="adaLN_modulation_1"
    )(nn.silu(c))
    shift_msa, scale_msa, shift_mlp, scale_mlp = jnp.split(mod, 4, axis=-1)
    return self.transformer(x, Modulation(shift_msa, scale_msa, None, shift_mlp, scale_mlp, None))


class AdaLNFinalLayer(AdaLNZeroFinalLayer):
  """adaLN (shift, scale from c (B, D), default init) then a zero-init linear, (B, N, out)."""

  modulation_init: Callable = xavier_uniform


class PlainBlock(Block):
  """Pre-LayerNorm ViT block without adaLN, (B, N, D) -> (B, N, D) ("in_context")."""

  def _norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)

  def _attention(self, x: jax.Array) -> jax.Array:
    attn = SelfAttention(self.num_heads, self.qk_norm, self.attention_impl, self.dtype, name="attn")
    return x + attn(self._norm("norm1")(x))

  def _mlp(self, x: jax.Array) -> jax.Array:
    d = self.hidden_size
    mlp = Mlp(int(d * self.mlp_ratio), d, self.dtype, name="mlp")
    return x + mlp(self._norm("norm2")(x))

  @nn.compact
  def __call__(self, x):
    return self._mlp(self._attention(x))


class CrossAttnBlock(PlainBlock):
  """PlainBlock with a cross-attention to c (B, M, D) after the self-attention ("cross_attn")."""

  @nn.compact
  def __call__(self, x, c):
    x = self._attention(x)
    cross = CrossAttention(
      self.num_heads, self.qk_norm, self.attention_impl, self.dtype, name="cross_attn"
    )
    return self._mlp(x + cross(self._norm("norm_cross")(x), c))


class PlainFinalLayer(FinalLayer):
  """LayerNorm "norm_final" then a zero-init linear, (B, N, D) -> (B, N, out); c is unused."""

  @nn.compact
  def __call__(self, x, c):
    del c  # The condition reached the tokens through attention.
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm_final")(x)
    return nn.Dense(self.out_features, kernel_init=zeros, dtype=self.dtype, name="linear")(x)


def adaln_stack(
  block_cls: type[nn.Module], settings: BlockSettings, tokens: jax.Array, cond: Conditioning
) -> jax.Array:
  """Every block modulated (ungated) by cond.vector; (B, N, D) -> (B, N, D)."""
  return repeat_blocks(block_cls, settings, tokens, cond.vector)


def cross_attn_stack(
  block_cls: type[nn.Module], settings: BlockSettings, tokens: jax.Array, cond: Conditioning
) -> jax.Array:
  """Every block cross-attends to cond.tokens (B, M, D); (B, N, D) -> (B, N, D)."""
  return repeat_blocks(block_cls, settings, tokens, cond.tokens)


def in_context_stack(
  block_cls: type[nn.Module], settings: BlockSettings, tokens: jax.Array, cond: Conditioning
) -> jax.Array:
  """cond.tokens (B, M, D) join the sequence for the blocks; (B, N, D) -> (B, N, D)."""
  n = tokens.shape[1]
  tokens = repeat_blocks(block_cls, settings, jnp.concatenate([tokens, cond.tokens], axis=1))
  return tokens[:, :n]


ADALN = BlockType(AdaLNBlock, AdaLNFinalLayer, adaln_stack)
CROSS_ATTN = BlockType(CrossAttnBlock, PlainFinalLayer, cross_attn_stack)
IN_CONTEXT = BlockType(PlainBlock, PlainFinalLayer, in_context_stack)
