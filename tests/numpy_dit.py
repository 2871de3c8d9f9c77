"""A float64 NumPy reference of the DiT family, for torch-free tests of the model's maths.

Written from the papers and the original code, not from dit/models/ (nothing is imported
from dit/): DiT (Peebles & Xie 2023, facebookresearch/DiT models.py: adaLN-Zero, and the
Figure 5 variants adaLN, cross-attention, in-context), PixArt-alpha (Chen et al. 2023:
adaLN-single, caption cross-attention, the 1024px size micro-conditioning) and the LCM
guidance embedding. It reads the Flax parameter tree (names as dit/models/dit.py's module
docstring lists them, kernels (in, out)); tests/test_convert.py checks separately that the
converters put the PyTorch weights there.

  out = forward(params, fields, x, t, cond)   # as DiT(**fields).apply({"params": params}, ...)

Conventions (the references'): tokens in raster order, patches flattened (row, column,
channel); LayerNorm eps 1e-6; GELU with the tanh approximation; the timestep sinusoid is
[cos, sin].
"""

from __future__ import annotations

import math

import numpy as np


def f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def linear(p: dict, x: np.ndarray) -> np.ndarray:
  """y = x W + b with W (in, out) (the transpose of torch.nn.Linear's weight)."""
  return x @ f64(p["kernel"]) + f64(p["bias"])


def silu(x):
  return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x, p: dict | None = None, eps: float = 1e-6):
  """LayerNorm over the last axis; `p` holds "scale" and "bias" (None: no affine part)."""
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  y = (x - mean) / np.sqrt(var + eps)
  return y if p is None else y * f64(p["scale"]) + f64(p["bias"])


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0, freq_shift: float = 0.0):
  """DiT's sinusoid: [cos(t w_0..w_{h-1}), sin(t w_0..w_{h-1})], w_i = max_period^(-i/(h - s)),
  h = dim / 2 (s = 1 is diffusers' downscale_freq_shift)."""
  half = dim // 2
  freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - freq_shift))
  args = f64(t)[:, None] * freqs[None]
  return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def timestep_mlp(p: dict, t, freq_shift: float = 0.0):
  """TimestepEmbedder: sinusoid -> Linear -> SiLU -> Linear."""
  return linear(p["mlp_2"], silu(linear(p["mlp_0"], timestep_embedding(t, freq_shift=freq_shift))))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(d)) v over (B, L, H, Dh); mask (B, 1, 1, Lk) bool, True = attend."""
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  return np.einsum("bhqk,bkhd->bqhd", softmax(logits), v)


def self_attention(p: dict, x, heads: int):
  """timm's Attention: one qkv Linear, its output read as (3, heads, head_dim)."""
  b, n, d = x.shape
  qkv = linear(p["qkv"], x).reshape(b, n, 3, heads, d // heads)
  out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
  return linear(p["proj"], out.reshape(b, n, d))


def cross_attention(p: dict, x, y, heads: int, mask=None):
  """PixArt's MultiHeadCrossAttention: q from x, one kv Linear on y read as (2, heads, dh)."""
  (b, n, d), length = x.shape, y.shape[1]
  q = linear(p["q_linear"], x).reshape(b, n, heads, d // heads)
  kv = linear(p["kv_linear"], y).reshape(b, length, 2, heads, d // heads)
  mask = None if mask is None else np.asarray(mask, bool)[:, None, None, :]
  out = attention(q, kv[:, :, 0], kv[:, :, 1], mask)
  return linear(p["proj"], out.reshape(b, n, d))


def mlp(p: dict, x):
  return linear(p["fc2"], gelu_tanh(linear(p["fc1"], x)))


def modulate(x, shift, scale):
  return x * (1.0 + scale[:, None]) + shift[:, None]


def pos_embed(dim: int, grid_h: int, grid_w: int, base: float, interpolation: float = 1.0):
  """The fixed 2D sin-cos table, (grid_h * grid_w, dim), from its definition: token (r, c)
  sits at column position c / (grid_w / base) / interpolation and row position likewise;
  channels [sin(col w), cos(col w), sin(row w), cos(row w)], w_i = 10000^(-i / (dim / 4))."""
  w = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
  table = np.zeros((grid_h * grid_w, dim))
  for r in range(grid_h):
    for c in range(grid_w):
      col = c / (grid_w / base) / interpolation
      row = r / (grid_h / base) / interpolation
      table[r * grid_w + c] = np.concatenate(
        [np.sin(col * w), np.cos(col * w), np.sin(row * w), np.cos(row * w)]
      )
  return table


def patchify(x, p: int):
  """(B, H, W, C) -> (B, H/p * W/p, p * p * C): raster-order tokens, each patch (u, v, c)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, grid_h: int, grid_w: int, p: int):
  """The inverse of `patchify`: (B, gh * gw, p * p * C) -> (B, gh p, gw p, C)."""
  b = tokens.shape[0]
  c = tokens.shape[-1] // (p * p)
  x = tokens.reshape(b, grid_h, grid_w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid_h * p, grid_w * p, c)


# ---- Blocks ---------------------------------------------------------------------------------


def gated_block(p: dict, x, mod, heads: int, y=None, y_mask=None):
  """adaLN(-Zero) block: mod = [shift, scale, gate] of the attention then of the MLP, each
  (B, D); a gate of None is 1 (adaLN without gates). PixArt adds a plain cross-attention."""
  shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
  h = self_attention(p["attn"], modulate(layer_norm(x), shift_msa, scale_msa), heads)
  x = x + (h if gate_msa is None else gate_msa[:, None] * h)
  if y is not None:
    x = x + cross_attention(p["cross_attn"], x, y, heads, y_mask)
  h = mlp(p["mlp"], modulate(layer_norm(x), shift_mlp, scale_mlp))
  return x + (h if gate_mlp is None else gate_mlp[:, None] * h)


def plain_block(p: dict, x, heads: int, context=None):
  """Pre-LayerNorm ViT block; with `context`, a cross-attention after the self-attention."""
  x = x + self_attention(p["attn"], layer_norm(x, p["norm1"]), heads)
  if context is not None:
    x = x + cross_attention(p["cross_attn"], layer_norm(x, p["norm_cross"]), context, heads)
  return x + mlp(p["mlp"], layer_norm(x, p["norm2"]))


# ---- The model -------------------------------------------------------------------------------

DEFAULTS = dict(
  num_classes=1000,
  learn_sigma=True,
  block="adaln_zero",
  caption_channels=0,
  null_caption="learned",
  pe_interpolation=1.0,
  time_freq_shift=0.0,
  size_conditioning=False,
  guidance_embedding=False,
)


def forward(params: dict, fields: dict, x, t, cond: dict | None = None) -> np.ndarray:
  """The DiT of `fields` (DiT's constructor arguments) on x (B, H, W, C), t (B,), cond (the
  keys DiT.__call__ documents). A "frozen" null caption must be passed as cond["null_text"]."""
  f = {**DEFAULTS, **fields}
  cond = dict(cond or {})
  x = f64(x)
  b, h, w, _ = x.shape
  p, d, heads, block = f["patch_size"], f["hidden_size"], f["num_heads"], f["block"]
  gh, gw = h // p, w // p
  base = f["input_size"] // p
  tokens = linear(params["x_embedder"], patchify(x, p))
  tokens = tokens + pos_embed(d, gh, gw, base, f["pe_interpolation"])[None]
  drop = np.asarray(cond.get("drop", np.zeros(b, bool)), bool)

  # The condition vector c = timestep (+ size, + guidance) (+ label) embedding.
  t_emb = timestep_mlp(params["t_embedder"], t, f["time_freq_shift"])
  if f["size_conditioning"]:
    parts = []
    for key in ("resolution", "aspect_ratio"):  # (B, 2) and (B, 1): every scalar embedded.
      value = f64(cond[key]).reshape(-1)
      parts.append(timestep_mlp(params[f"{key}_embedder"], value).reshape(b, -1))
    t_emb = t_emb + np.concatenate(parts, axis=-1)
  if f["guidance_embedding"]:
    t_emb = t_emb + timestep_mlp(params["w_embedder"], 1000.0 * f64(cond["guidance"]))
  c, cond_tokens = t_emb, [t_emb]
  if f["num_classes"] > 0:
    labels = np.asarray(cond.get("label", np.full(b, f["num_classes"])))
    labels = np.where(drop, f["num_classes"], labels)
    y_emb = f64(params["y_embedder"]["embedding"])[labels]
    c = c + y_emb
    cond_tokens.append(y_emb)

  caption = caption_mask = None
  if f["caption_channels"] > 0:
    learned = f["null_caption"] == "learned"
    null = f64(params["y_embedding"] if learned else cond.get("null_text", np.nan))
    if "text" in cond:
      text = f64(cond["text"])
      caption_mask = np.asarray(cond.get("text_mask", np.ones(text.shape[:2])), bool)
      if drop.any():
        text = np.where(drop[:, None, None], null[None, : text.shape[1]], text)
    else:
      text = np.broadcast_to(null[None], (b, *null.shape))
      caption_mask = np.ones(text.shape[:2], bool)
    caption = mlp(params["y_proj"], text)

  depth = len([k for k in params if k.startswith("blocks_")])
  blocks = [params[f"blocks_{i}"] for i in range(depth)]
  final = params["final_layer"]
  if block == "adaln_zero":
    for bp in blocks:
      mod = np.split(linear(bp["adaLN_modulation_1"], silu(c)), 6, axis=-1)
      tokens = gated_block(bp, tokens, mod, heads, caption, caption_mask)
  elif block == "adaln":
    for bp in blocks:
      shift_msa, scale_msa, shift_mlp, scale_mlp = np.split(
        linear(bp["adaLN_modulation_1"], silu(c)), 4, axis=-1
      )
      mod = (shift_msa, scale_msa, None, shift_mlp, scale_mlp, None)
      tokens = gated_block(bp, tokens, mod, heads)
  elif block == "adaln_single":
    shared = linear(params["t_block_1"], silu(c)).reshape(b, 6, d)
    for bp in blocks:
      mod = f64(bp["scale_shift_table"])[None] + shared
      tokens = gated_block(bp, tokens, [mod[:, i] for i in range(6)], heads, caption, caption_mask)
  elif block == "cross_attn":
    context = np.stack(cond_tokens, axis=1)
    for bp in blocks:
      tokens = plain_block(bp, tokens, heads, context)
  elif block == "in_context":
    n = tokens.shape[1]
    tokens = np.concatenate([tokens, np.stack(cond_tokens, axis=1)], axis=1)
    for bp in blocks:
      tokens = plain_block(bp, tokens, heads)
    tokens = tokens[:, :n]
  else:
    raise ValueError(f"no reference for block {block!r}")

  # Final layer: adaLN (shift, scale) or a plain LayerNorm, then a Linear.
  if block == "adaln_single":
    shift, scale = (f64(final["scale_shift_table"])[None] + c[:, None]).transpose(1, 0, 2)
    tokens = modulate(layer_norm(tokens), shift, scale)
  elif block in ("cross_attn", "in_context"):
    tokens = layer_norm(tokens, final["norm_final"])
  else:
    shift, scale = np.split(linear(final["adaLN_modulation_1"], silu(c)), 2, axis=-1)
    tokens = modulate(layer_norm(tokens), shift, scale)
  return unpatchify(linear(final["linear"], tokens), gh, gw, p)
