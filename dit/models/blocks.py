"""The production block types and the interface every block type implements.

A block type (an entry of `dit.models.dit.BLOCKS`) says how the conditioning enters the
transformer. It is a `BlockType`: a block class, the matching final layer class, and a `stack`
function that runs `depth` blocks over the tokens. DiT calls the stack inside its own
`__call__`, so every module the stack creates (blocks_{i}, a shared t_block_1, ...) is a child
of DiT and keeps the parameter paths the converters (dit/models/convert.py) expect.

How the blocks run (unrolled, scanned, rematerialised) is `repeat_blocks`'s, the same for every
block type; see its docstring.

Here: "adaln_zero" (DiT: per-block SiLU -> Linear -> 6 modulations, zero-initialised) and
"adaln_single" (PixArt-alpha: one shared t_block, a learned scale_shift_table per block); both
cross-attend to a projected caption when the model has one. The DiT-paper ablations live in
dit/models/ablation_blocks.py.

Block options, the same for every block type here and in ablation_blocks.py (BlockSettings,
`block_options`): norm "layernorm" | "rmsnorm" (dit/models/layers.py norm_layer), mlp "gelu" |
"swiglu" (layers.py feed_forward), qk_norm "" | "layernorm" | "rmsnorm" (attention.py), and
rotary positions: cond.rope, (cos, sin) computed once per forward by DiT and passed to every
block's self-attention (an argument like the others, so repeat_blocks scans it unchanged).

Shapes: B batch, N image tokens, D hidden size, L caption tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit.models.attention import CrossAttention, SelfAttention
from dit.models.layers import feed_forward, modulate, norm_layer, normal_02, scale_shift_init, zeros
from dit.models.repeat import repeat_blocks


class Conditioning(NamedTuple):
  """Everything a block stack may condition on."""

  vector: jax.Array  # (B, D): timestep + label (+ size, guidance) embedding.
  tokens: jax.Array  # (B, M, D), M <= 2: [timestep (+ size, guidance), label] embeddings.
  caption: jax.Array | None = None  # (B, L, D): the projected caption, or None.
  caption_mask: jax.Array | None = None  # (B, L) bool, True = real token.
  # (cos, sin), each (N, Dh) float32: the rotation of the image tokens' queries and keys in
  # every self-attention (DiT.pos_embed "rope" / "both"), or None.
  rope: tuple[jax.Array, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """The transformer's size and numerics, the same for every block type."""

  depth: int
  hidden_size: int
  num_heads: int
  mlp_ratio: float
  qk_norm: str | bool  # A QK_NORMS name (or the older bool).
  attention_impl: str
  dtype: Any  # The compute dtype (a jnp.dtype); params stay float32.
  # DiT's block options (layers.NORMS, layers.MLPS), passed to the block classes derived from
  # `Block` by `block_options`, not by block_fields (other architectures' blocks lack them).
  norm: str = "layernorm"
  mlp: str = "gelu"
  # How the blocks run, not what they compute (repeat_blocks): one block traced in a
  # lax.scan, and rematerialisation in the backward pass with a REMAT_POLICIES name.
  scan: bool = False
  remat: bool = False
  remat_policy: str = ""

  def block_fields(self) -> dict[str, Any]:
    """Constructor arguments every block class takes (the settings of one block)."""
    fields = dataclasses.asdict(self)
    for name in ("depth", "scan", "remat", "remat_policy", "norm", "mlp"):
      del fields[name]
    return fields

  def block_options(self) -> dict[str, str]:
    """The norm and MLP choices, fields of `Block` (the stacks here pass them on)."""
    return {"norm": self.norm, "mlp": self.mlp}


# (block_cls, settings, tokens (B, N, D), cond) -> tokens (B, N, D). A stack runs its blocks
# with `repeat_blocks`, which applies settings.scan, remat and remat_policy.
Stack = Callable[[type[nn.Module], BlockSettings, jax.Array, Conditioning], jax.Array]


class BlockType(NamedTuple):
  """A registry entry: how the conditioning enters the blocks.

  block: the transformer block class (takes BlockSettings.block_fields() as arguments).
  final_layer: class with fields (hidden_size, out_features, dtype); called (tokens (B, N, D),
    cond.vector (B, D)) -> (B, N, out_features); DiT names it "final_layer".
  stack: runs the blocks, see `Stack`; a new stack (joint text/image streams) is a new
    function, not a new DiT field.
  captions: whether the blocks can cross-attend to a caption (caption_channels > 0).
  """

  block: type[nn.Module]
  final_layer: type[nn.Module]
  stack: Stack
  captions: bool = False


# ----------------------------------------------------------------------------------------------
# adaLN blocks.


class Modulation(NamedTuple):
  """Per-block adaLN parameters, each (B, D); gates None = ungated (a gate of 1)."""

  shift_msa: jax.Array
  scale_msa: jax.Array
  gate_msa: jax.Array | None
  shift_mlp: jax.Array
  scale_mlp: jax.Array
  gate_mlp: jax.Array | None

  @classmethod
  def split6(cls, mod: jax.Array) -> Modulation:
    """(B, 6 D) -> shift, scale, gate of the attention, then of the MLP (the reference order)."""
    return cls(*jnp.split(mod, 6, axis=-1))


class Block(nn.Module):
  """The fields every block class takes: `BlockSettings.block_fields()` and `block_options()`.

  norm: the pre-attention and pre-MLP norms norm1, norm2 (layers.norm_layer); mlp: the
  feed-forward "mlp" (layers.feed_forward); qk_norm: of the attentions' queries and keys.
  """

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: str | bool = ""
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  norm: str = "layernorm"
  mlp: str = "gelu"

  def feed_forward(self) -> nn.Module:
    return feed_forward(self.mlp, self.hidden_size, self.mlp_ratio, self.dtype, name="mlp")


class ModulatedBlock(Block):
  """Base of the adaLN blocks: modulated self-attention, optional cross-attention, MLP.

  Subclasses compute the `Modulation` from their conditioning and call `transformer`.
  """

  cross_attn: bool = False

  def transformer(
    self,
    x: jax.Array,
    m: Modulation,
    y: jax.Array | None = None,
    y_mask: jax.Array | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """x: (B, N, D) tokens; y: (B, L, D) caption (with cross_attn); y_mask: (B, L); rope:
    (cos, sin) (N, Dh) each, or None."""
    dtype = self.dtype
    attn = SelfAttention(self.num_heads, self.qk_norm, self.attention_impl, dtype, name="attn")
    norm1 = norm_layer(self.norm, dtype, name="norm1")
    h = attn(modulate(norm1(x), m.shift_msa, m.scale_msa), rope=rope)
    x = x + (h if m.gate_msa is None else m.gate_msa[:, None] * h)
    if self.cross_attn:
      # PixArt: no norm and no gate before the cross-attention.
      cross = CrossAttention(
        self.num_heads, self.qk_norm, self.attention_impl, dtype, name="cross_attn"
      )
      x = x + cross(x, y, y_mask)
    norm2 = norm_layer(self.norm, dtype, name="norm2")
    h = self.feed_forward()(modulate(norm2(x), m.shift_mlp, m.scale_mlp))
    return x + (h if m.gate_mlp is None else m.gate_mlp[:, None] * h)


class AdaLNZeroBlock(ModulatedBlock):
  """DiT's adaLN-Zero block: c (B, D) -> SiLU -> zero-init Linear -> 6 modulations.

  Zero-initialised gates make a fresh block the identity on its tokens.
  """

  @nn.compact
  def __call__(self, x, c, y=None, y_mask=None, rope=None):
    """x: (B, N, D); c: (B, D); y: (B, L, D) or None; y_mask: (B, L) or None; rope: (cos,
    sin) or None -> (B, N, D)."""
    mod = nn.Dense(
      6 * self.hidden_size, kernel_init=zeros, dtype=self.dtype, name="adaLN_modulation_1"
    )(nn.silu(c))
    return self.transformer(x, Modulation.split6(mod), y, y_mask, rope)


class AdaLNSingleBlock(ModulatedBlock):
  """PixArt-alpha's adaLN-single block: the shared t_block output plus a per-block table."""

  @nn.compact
  def __call__(self, x, c, y=None, y_mask=None, rope=None):
    """x: (B, N, D); c: (B, 6 D) t_block output; y: (B, L, D) or None; rope: (cos, sin) or
    None -> (B, N, D)."""
    d = self.hidden_size
    table = self.param("scale_shift_table", scale_shift_init, (6, d))
    mod = (table[None] + c.reshape(-1, 6, d)).reshape(-1, 6 * d).astype(self.dtype)
    return self.transformer(x, Modulation.split6(mod), y, y_mask, rope)


def modulated_linear(
  x: jax.Array,
  shift: jax.Array,
  scale: jax.Array,
  out_features: int,
  dtype: Any,
  norm: str = "layernorm",
) -> jax.Array:
  """The final layers' tail: norm "norm_final" (plain LayerNorm, or RMSNorm with its scale as
  LightningDiT), modulate, zero-init Linear "linear" (B, N, out)."""
  x = modulate(norm_layer(norm, dtype, name="norm_final")(x), shift, scale)
  return nn.Dense(out_features, kernel_init=zeros, dtype=dtype, name="linear")(x)


class FinalLayer(nn.Module):
  """The fields every final layer takes; called (x (B, N, D), c (B, D)) -> (B, N, out).

  norm: its norm "norm_final" (layers.NORMS), the blocks' choice.
  """

  hidden_size: int
  out_features: int
  dtype: Any = jnp.float32
  norm: str = "layernorm"


class AdaLNZeroFinalLayer(FinalLayer):
  """adaLN (shift, scale regressed from c (B, D)) then a zero-init linear, (B, N, out).

  The regression starts at zero (DiT), so a fresh model outputs zero; the DiT-paper "adaln"
  ablation starts it at `modulation_init=xavier_uniform` instead.
  """

  modulation_init: Callable = zeros

  @nn.compact
  def __call__(self, x, c):
    mod = nn.Dense(
      2 * self.hidden_size,
      kernel_init=self.modulation_init,
      dtype=self.dtype,
      name="adaLN_modulation_1",
    )(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    return modulated_linear(x, shift, scale, self.out_features, self.dtype, self.norm)


class AdaLNSingleFinalLayer(FinalLayer):
  """PixArt: shift, scale = scale_shift_table (2, D) + c (B, D), then a zero-init linear."""

  @nn.compact
  def __call__(self, x, c):
    table = self.param("scale_shift_table", scale_shift_init, (2, self.hidden_size))
    mod = (table[None] + c[:, None]).astype(self.dtype)
    return modulated_linear(x, mod[:, 0], mod[:, 1], self.out_features, self.dtype, self.norm)


def adaln_zero_stack(
  block_cls: type[nn.Module], settings: BlockSettings, tokens: jax.Array, cond: Conditioning
) -> jax.Array:
  """Every block regresses its own modulation from cond.vector; (B, N, D) -> (B, N, D)."""
  y, y_mask = cond.caption, cond.caption_mask
  return repeat_blocks(
    block_cls,
    settings,
    tokens,
    cond.vector,
    y,
    y_mask,
    cond.rope,
    cross_attn=y is not None,
    **settings.block_options(),
  )


def adaln_single_stack(
  block_cls: type[nn.Module], settings: BlockSettings, tokens: jax.Array, cond: Conditioning
) -> jax.Array:
  """One shared t_block_1 (B, D) -> (B, 6 D) feeds every block's table; (B, N, D) -> same."""
  d, dtype = settings.hidden_size, settings.dtype
  shared = nn.Dense(6 * d, kernel_init=normal_02, dtype=dtype, name="t_block_1")(
    nn.silu(cond.vector)
  )
  y, y_mask = cond.caption, cond.caption_mask
  options = settings.block_options()
  return repeat_blocks(
    block_cls, settings, tokens, shared, y, y_mask, cond.rope, cross_attn=y is not None, **options
  )


ADALN_ZERO = BlockType(AdaLNZeroBlock, AdaLNZeroFinalLayer, adaln_zero_stack, captions=True)
ADALN_SINGLE = BlockType(AdaLNSingleBlock, AdaLNSingleFinalLayer, adaln_single_stack, captions=True)
