"""Multi-head attention for DiT/PixArt: self-attention and masked cross-attention.

One function does the attention itself, with a choice of backend:
  "xla"    jax.nn.dot_product_attention(implementation="xla") (any device),
  "cudnn"  jax.nn.dot_product_attention(implementation="cudnn") (NVIDIA GPU, bf16/fp16 only),
  "einsum" a plain softmax(q k^T / sqrt(d)) v, the readable reference.
Masks are boolean, True = attend, and work in all three.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "einsum")

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


class _QKNorm(nn.Module):
  """LayerNorm over the head dimension of q or k (qk-norm), float32 statistics."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (as the original DiT)."""

  num_heads: int
  qk_norm: bool = False
  implementation: str = "xla"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: (B, L, D) -> (B, L, D)."""
    b, length, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"hidden size {d} is not divisible by num_heads={self.num_heads}")
    qkv = nn.Dense(3 * d, kernel_init=xavier_uniform, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, length, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm:
      q = _QKNorm(self.dtype, name="q_norm")(q)
      k = _QKNorm(self.dtype, name="k_norm")(k)
    out = dot_product_attention(q, k, v, mask, implementation=self.implementation)
    out = out.reshape(b, length, d)
    return nn.Dense(d, kernel_init=xavier_uniform, dtype=self.dtype, name="proj")(out)


class CrossAttention(nn.Module):
  """Multi-head cross-attention from image tokens to caption tokens (PixArt).

  The output projection is zero-initialised, so a fresh block starts as the identity.
  """

  num_heads: int
  qk_norm: bool = False
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
    if self.qk_norm:
      q = _QKNorm(self.dtype, name="q_norm")(q)
      k = _QKNorm(self.dtype, name="k_norm")(k)
    if mask is not None:
      mask = jnp.asarray(mask, dtype=bool)[:, None, None, :]  # (B, 1, 1, L)
    out = dot_product_attention(q, k, v, mask, implementation=self.implementation)
    out = out.reshape(b, n, d)
    return nn.Dense(d, kernel_init=zeros, dtype=self.dtype, name="proj")(out)
