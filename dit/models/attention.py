"""Multi-head attention for DiT/PixArt: self-attention and masked cross-attention.

One function does the attention itself, with a choice of backend:
  "xla"    jax.nn.dot_product_attention(implementation="xla") (any device),
  "cudnn"  jax.nn.dot_product_attention(implementation="cudnn") (NVIDIA GPU, bf16/fp16 only),
  "einsum" a plain softmax(q k^T / sqrt(d)) v, the readable reference.
Masks are boolean, True = attend, and work in all three.

Options: QK-norm (qk_norm "" | "layernorm" | "rmsnorm", per head over the head dimension) and
rotary positions (SelfAttention's `rope` argument: (cos, sin) from dit/models/rope.py, applied
to queries and keys after their norm, as LightningDiT).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit.models.rope import apply_rope

IMPLEMENTATIONS = ("xla", "cudnn", "einsum")
# qk_norm values; also False (= "") and True (= "layernorm"), the older boolean field.
QK_NORMS = ("", "layernorm", "rmsnorm")

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None = None,
  *,
  implementation: str = "xla",
) -> jax.Array:
  """Scaled dot-product attention.

  Args:
    q: (B, Lq, H, Dh) queries.
    k, v: (B, Lk, H, Dh) keys and values.
    mask: optional boolean, broadcastable to (B, H, Lq, Lk); True where a query may attend.
    implementation: one of IMPLEMENTATIONS.

  Returns:
    (B, Lq, H, Dh), in the dtype of q.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
    )
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
  if implementation == "einsum":
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  if mask is not None:
    # jax.nn.dot_product_attention wants a mask of rank 4: (B or 1, H or 1, Lq, Lk).
    mask = jnp.broadcast_to(mask, mask.shape[:-2] + (q.shape[1], k.shape[1]))
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def qk_norm_kind(qk_norm: str | bool) -> str:
  """A qk_norm value as a QK_NORMS name: False -> "", True -> "layernorm" (older configs)."""
  if isinstance(qk_norm, bool):
    return "layernorm" if qk_norm else ""
  if qk_norm not in QK_NORMS:
    raise ValueError(f"qk_norm must be one of {QK_NORMS} (or a bool), got {qk_norm!r}")
  return qk_norm


class _QKNorm(nn.Module):
  """LayerNorm over the head dimension of q or k (qk-norm), float32 statistics."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)


def qk_norm_layer(qk_norm: str | bool, dtype, name: str) -> nn.Module:
  """The norm of q or k (B, L, H, Dh) over Dh, eps 1e-6, with learnable scale (and bias).

  "layernorm": params {name}/LayerNorm_0/{scale, bias} (the layout of the boolean qk_norm);
  "rmsnorm": {name}/scale.
  """
  if qk_norm_kind(qk_norm) == "rmsnorm":
    return nn.RMSNorm(epsilon=1e-6, dtype=dtype, name=name)
  return _QKNorm(dtype, name=name)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (as the original DiT)."""

  num_heads: int
  qk_norm: str | bool = ""
  implementation: str = "xla"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """x: (B, L, D) -> (B, L, D); rope: (cos, sin), each (L, Dh) or (B, L, Dh), or None."""
    b, length, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"hidden size {d} is not divisible by num_heads={self.num_heads}")
    qkv = nn.Dense(3 * d, kernel_init=xavier_uniform, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, length, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if qk_norm_kind(self.qk_norm):
      q = qk_norm_layer(self.qk_norm, self.dtype, "q_norm")(q)
      k = qk_norm_layer(self.qk_norm, self.dtype, "k_norm")(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = dot_product_attention(q, k, v, mask, implementation=self.implementation)
    out = out.reshape(b, length, d)
    return nn.Dense(d, kernel_init=xavier_uniform, dtype=self.dtype, name="proj")(out)


class CrossAttention(nn.Module):
  """Multi-head cross-attention from image tokens to caption tokens (PixArt).

  The output projection is zero-initialised, so a fresh block starts as the identity.
  """

  num_heads: int
  qk_norm: str | bool = ""
  implementation: str = "xla"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: (B, N, D) queries; y: (B, L, D) context; mask: (B, L), True/1 = real token."""
    b, n, d = x.shape
    length = y.shape[1]
    h = self.num_heads
    q = nn.Dense(d, kernel_init=xavier_uniform, dtype=self.dtype, name="q_linear")(x)
    kv = nn.Dense(2 * d, kernel_init=xavier_uniform, dtype=self.dtype, name="kv_linear")(y)
    q = q.reshape(b, n, h, d // h)
    kv = kv.reshape(b, length, 2, h, d // h)
    k, v = kv[:, :, 0], kv[:, :, 1]
    if qk_norm_kind(self.qk_norm):
      q = qk_norm_layer(self.qk_norm, self.dtype, "q_norm")(q)
      k = qk_norm_layer(self.qk_norm, self.dtype, "k_norm")(k)
    if mask is not None:
      mask = jnp.asarray(mask, dtype=bool)[:, None, None, :]  # (B, 1, 1, L)
    out = dot_product_attention(q, k, v, mask, implementation=self.implementation)
    out = out.reshape(b, n, d)
    return nn.Dense(d, kernel_init=zeros, dtype=self.dtype, name="proj")(out)
