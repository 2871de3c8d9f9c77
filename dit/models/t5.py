"""T5 v1.1 text encoder in Flax, loaded from Hugging Face safetensors.

PixArt conditions on the last hidden state of the T5 v1.1 XXL encoder. This file has the
encoder stack only: token embedding -> N x [RMSNorm -> self-attention with a shared
relative position bias -> residual, RMSNorm -> gated-GELU FFN -> residual] -> RMSNorm.
No biases, no attention scaling (T5 folds it into the initialisation), no absolute positions.

Parameter layout (Flax) next to the Hugging Face names it is converted from:

  shared/embedding                      shared.weight (V, D)
  relative_attention_bias/embedding     encoder.block.0.layer.0.SelfAttention
                                          .relative_attention_bias.weight
  block_{i}/attn_norm/scale             encoder.block.{i}.layer.0.layer_norm.weight
  block_{i}/attn/{q,k,v,o}/kernel       encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight (T)
  block_{i}/mlp_norm/scale              encoder.block.{i}.layer.1.layer_norm.weight
  block_{i}/mlp/{wi_0,wi_1,wo}/kernel   encoder.block.{i}.layer.1.DenseReluDense.*.weight (T)
  final_layer_norm/scale                encoder.final_layer_norm.weight

`TextEncoder` bundles a tokenizer, the module and its params behind one jitted `encode`.
Real runs use a real T5 (`TextEncoder.from_pretrained`); `TextEncoder.offline_demo` builds a
byte tokenizer and a small randomly initialised encoder so the text-to-image path can run
with nothing downloaded (the random encoder is a fixed feature map of the prompt, not a
language model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit.models import hub_files
from dit.models import tokenizers as tok_lib

_ACTIVATIONS = {
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}

# T5 v1.1 sizes (Raffel et al. 2020, v1.1 release): d_model, d_ff, num_layers, num_heads.
_PRESETS = {
  "small": (512, 1024, 8, 6),
  "base": (768, 2048, 12, 12),
  "large": (1024, 2816, 24, 16),
  "xl": (2048, 5120, 24, 32),
  "xxl": (4096, 10240, 24, 64),
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 encoder; field names follow Hugging Face's `T5Config`."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "gelu_new"
  is_gated_act: bool = True

  def __post_init__(self):
    if self.dense_act_fn not in _ACTIVATIONS:
      raise ValueError(
        f"Unsupported T5 activation {self.dense_act_fn!r}; expected one of {sorted(_ACTIVATIONS)}."
      )
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}.")

  @classmethod
  def preset(cls, name: str) -> T5Config:
    """T5 v1.1 `small` | `base` | `large` | `xl` | `xxl` (vocab 32128, d_kv 64, gated-GELU)."""
    if name not in _PRESETS:
      raise ValueError(f"Unknown T5 v1.1 preset {name!r}; expected one of {list(_PRESETS)}.")
    d_model, d_ff, num_layers, num_heads = _PRESETS[name]
    return cls(d_model=d_model, d_ff=d_ff, num_layers=num_layers, num_heads=num_heads)

  @classmethod
  def from_dict(cls, hf_config: dict[str, Any]) -> T5Config:
    """Reads a Hugging Face T5/mT5 `config.json` dict (decoder fields are ignored)."""
    model_type = hf_config.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
      raise ValueError(f"Expected a T5 config (model_type 't5' or 'mt5'), got {model_type!r}.")
    # Same parsing as transformers' T5Config: "gated-gelu" means gated tanh-GELU.
    proj = hf_config.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"Bad feed_forward_proj {proj!r}; expected '<act>' or 'gated-<act>'.")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    d_model = hf_config["d_model"]
    return cls(
      vocab_size=hf_config["vocab_size"],
      d_model=d_model,
      d_kv=hf_config.get("d_kv", 64),
      d_ff=hf_config["d_ff"],
      num_layers=hf_config["num_layers"],
      num_heads=hf_config["num_heads"],
      relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
      dense_act_fn=act,
      is_gated_act=parts[0] == "gated",
    )

  @classmethod
  def from_pretrained_dir(cls, model_dir: str) -> T5Config:
    """Reads `<model_dir>/config.json`."""
    return cls.from_dict(hub_files.read_config(model_dir))


def relative_position_buckets(
  query_len: int, key_len: int, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
  """Bidirectional T5 relative-position bucket ids, (query_len, key_len) int32 in [0, num_buckets).

  Half the buckets hold the sign; of the rest, half are exact offsets and half are log-spaced
  up to `max_distance`. Computed in NumPy float32 with the same operations as the PyTorch
  reference so boundary offsets land in the same bucket.
  """
  rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]  # memory - query
  num_buckets //= 2
  buckets = (rel > 0).astype(np.int64) * num_buckets
  rel = np.abs(rel)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):  # log(0) is discarded by the `where` below.
    scaled = (
      np.log(rel.astype(np.float32) / np.float32(max_exact))
      / np.float32(math.log(max_distance / max_exact))
      * np.float32(num_buckets - max_exact)
    )
  large = max_exact + np.where(rel < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction; statistics in float32."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return x32.astype(self.dtype) * scale.astype(self.dtype)


class T5Attention(nn.Module):
  """Unscaled multi-head self-attention with an additive position bias.

  x: (B, L, D); bias: (1, H, L, L) float32; mask: (B, L) with 1 = real token -> (B, L, D).
  """

  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    std = cfg.d_model**-0.5
    dense = lambda name, features, init_std: nn.DenseGeneral(
      features,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.normal(init_std),
      name=name,
    )
    # Hugging Face's init: q absorbs the 1/sqrt(d_kv) that T5 leaves out of the logits.
    q = dense("q", inner, std * cfg.d_kv**-0.5)(x)
    k = dense("k", inner, std)(x)
    v = dense("v", inner, std)(x)
    split = lambda t: t.reshape(*t.shape[:-1], cfg.num_heads, cfg.d_kv)
    q, k, v = split(q), split(k), split(v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits + bias
    logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:-1], inner)
    return dense("o", cfg.d_model, inner**-0.5)(out)


class T5FeedForward(nn.Module):
  """Gated (v1.1: act(x wi_0) * (x wi_1)) or plain (v1.0: act(x wi)) FFN, (B, L, D) -> (B, L, D)."""

  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda name, features, init_std: nn.Dense(
      features,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.normal(init_std),
      name=name,
    )
    act = _ACTIVATIONS[cfg.dense_act_fn]
    std = cfg.d_model**-0.5
    if cfg.is_gated_act:
      h = act(dense("wi_0", cfg.d_ff, std)(x)) * dense("wi_1", cfg.d_ff, std)(x)
    else:
      h = act(dense("wi", cfg.d_ff, std)(x))
    return dense("wo", cfg.d_model, cfg.d_ff**-0.5)(h)


class T5Block(nn.Module):
  """Pre-norm transformer block: (B, L, D) -> (B, L, D)."""

  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(cfg.layer_norm_epsilon, name="attn_norm", **kw)(x)
    x = x + T5Attention(cfg, name="attn", **kw)(h, bias, mask)
    h = RMSNorm(cfg.layer_norm_epsilon, name="mlp_norm", **kw)(x)
    return x + T5FeedForward(cfg, name="mlp", **kw)(h)


class T5Encoder(nn.Module):
  """T5 encoder stack.

  Attributes:
    config: sizes; see `T5Config`.
    dtype: compute dtype (float32 or bfloat16); norms and softmax run in float32.
    param_dtype: dtype of freshly initialised params (loaded params keep their own dtype).
  """

  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids (B, L) int; attention_mask (B, L), 1 = real token -> hidden states (B, L, D).

    Padded positions get values too (as in the reference); consumers should apply the mask.
    """
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x = nn.Embed(
      cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(1.0), name="shared", **kw
    )(input_ids)
    # One bias table for the whole stack (the reference stores it in block 0 and shares it).
    length = input_ids.shape[1]
    buckets = relative_position_buckets(
      length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    )
    bias = nn.Embed(
      cfg.relative_attention_num_buckets,
      cfg.num_heads,
      embedding_init=nn.initializers.normal(cfg.d_model**-0.5),
      name="relative_attention_bias",
      param_dtype=self.param_dtype,
      dtype=jnp.float32,
    )(jnp.asarray(buckets))
    bias = jnp.transpose(bias, (2, 0, 1))[None]  # (1, H, L, L)
    for i in range(cfg.num_layers):
      x = T5Block(cfg, name=f"block_{i}", **kw)(x, bias, attention_mask)
    return RMSNorm(cfg.layer_norm_epsilon, name="final_layer_norm", **kw)(x)


# ----------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints.


def _hf_to_flax(config: T5Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  """Hugging Face name -> (Flax param path, expected PyTorch shape, transpose?)."""
  c = config
  inner = c.num_heads * c.d_kv
  table = {
    "shared.weight": (("shared", "embedding"), (c.vocab_size, c.d_model), False),
    "encoder.final_layer_norm.weight": (("final_layer_norm", "scale"), (c.d_model,), False),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
      ("relative_attention_bias", "embedding"),
      (c.relative_attention_num_buckets, c.num_heads),
      False,
    ),
  }
  ffn_in = ("wi_0", "wi_1") if c.is_gated_act else ("wi",)
  ffn = {**{name: (c.d_ff, c.d_model) for name in ffn_in}, "wo": (c.d_model, c.d_ff)}
  for i in range(c.num_layers):
    pre, blk = f"encoder.block.{i}.layer", f"block_{i}"
    table[f"{pre}.0.layer_norm.weight"] = ((blk, "attn_norm", "scale"), (c.d_model,), False)
    table[f"{pre}.1.layer_norm.weight"] = ((blk, "mlp_norm", "scale"), (c.d_model,), False)
    for name in "qkvo":
      shape = (c.d_model, inner) if name == "o" else (inner, c.d_model)
      table[f"{pre}.0.SelfAttention.{name}.weight"] = ((blk, "attn", name, "kernel"), shape, True)
    for name, shape in ffn.items():
      table[f"{pre}.1.DenseReluDense.{name}.weight"] = ((blk, "mlp", name, "kernel"), shape, True)
  return table


def convert_hf_weights(
  weights: dict[str, np.ndarray], config: T5Config, dtype: Any = jnp.float32, source: str = "?"
) -> dict[str, Any]:
  """Flat Hugging Face T5 state dict -> Flax params {"params": ...} in `dtype`.

  Accepts `T5EncoderModel` and full `T5ForConditionalGeneration` checkpoints: decoder and
  lm_head tensors are dropped, and `encoder.embed_tokens.weight` stands in for a missing
  `shared.weight`. Raises ValueError naming missing, unexpected, mis-shaped or non-float tensors.
  """
  table = _hf_to_flax(config)
  encoder = {k: v for k, v in weights.items() if not k.startswith(("decoder.", "lm_head."))}
  tied = encoder.pop("encoder.embed_tokens.weight", None)
  if "shared.weight" not in encoder and tied is not None:
    encoder["shared.weight"] = tied
  hub_files.check_keys(encoder, {k: shape for k, (_, shape, _) in table.items()}, source)
  bad = [
    f"{k}: {v.dtype}" for k, v in sorted(encoder.items()) if not np.issubdtype(v.dtype, np.floating)
  ]
  if bad:
    raise ValueError(f"Checkpoint {source} has non-float tensors (expected floats): {bad}")
  params: dict[str, Any] = {}
  for key, (path, _, transpose) in table.items():
    value = encoder[key].T if transpose else encoder[key]
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(value, dtype=dtype)
  return {"params": params}


def load_t5_encoder(model_dir: str, dtype: Any = jnp.float32) -> tuple[T5Encoder, dict[str, Any]]:
  """Loads a Hugging Face T5 encoder directory (config.json + safetensors, single or sharded).

  `dtype` (float32 or bfloat16) is both the params dtype and the compute dtype.
  Returns (module, params) with params = {"params": ...}; call `module.apply(params, ids, mask)`.
  """
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"T5 dtype must be float32 or bfloat16, got {dtype!r}.")
  _check_model_dir(model_dir, need_tokenizer=False)
  config = T5Config.from_pretrained_dir(model_dir)
  weights = hub_files.read_safetensors(model_dir)
  params = convert_hf_weights(weights, config, dtype, source=model_dir)
  return T5Encoder(config, dtype=dtype, param_dtype=dtype), params


def _check_model_dir(model_dir: str, need_tokenizer: bool) -> None:
  """Raises FileNotFoundError listing everything a model directory lacks, all at once."""
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"T5 model directory {model_dir!r} does not exist.")
  have = set(os.listdir(model_dir))
  missing = []
  if "config.json" not in have:
    missing.append("config.json")
  if not have & {"model.safetensors", "model.safetensors.index.json"}:
    missing.append("model.safetensors (or model.safetensors.index.json + shards)")
  if need_tokenizer and not have & set(tok_lib.TOKENIZER_FILES):
    missing.append(" or ".join(tok_lib.TOKENIZER_FILES))
  if missing:
    raise FileNotFoundError(
      f"T5 model directory {model_dir!r} is missing {missing}; it holds {sorted(have)}."
    )


# ----------------------------------------------------------------------------------------
# Tokenizer + encoder in one object.


class TextEncoder:
  """Prompts -> T5 embeddings: tokenizer, module and params behind one jitted function.

  `encode(prompts)` returns (emb (B, L, D) float32, mask (B, L) int32) as JAX arrays, with
  L = the tokenizer's max_length. Padded positions of `emb` are not zeroed; use the mask.
  """

  def __init__(self, tokenizer: tok_lib.Tokenizer, module: T5Encoder, params: dict[str, Any]):
    if tokenizer.vocab_size > module.config.vocab_size:
      raise ValueError(
        f"Tokenizer has {tokenizer.vocab_size} ids but the encoder embeds only "
        f"{module.config.vocab_size}."
      )
    self.tokenizer, self.module, self.params = tokenizer, module, params
    apply = lambda p, ids, mask: module.apply(p, ids, mask).astype(jnp.float32)
    self._apply = jax.jit(apply)

  @property
  def max_length(self) -> int:
    return self.tokenizer.max_length

  @property
  def dim(self) -> int:
    """Width D of the embeddings (the DiT's `caption_channels`)."""
    return self.module.config.d_model

  def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """prompts (B strings) -> (emb (B, L, D) float32, mask (B, L) int32)."""
    ids, mask = self.tokenizer(prompts)
    return self._apply(self.params, jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)

  @classmethod
  def from_pretrained(
    cls,
    model_dir: str,
    max_length: int = 120,
    dtype: Any = jnp.float32,
    overflow: str = "warn",
  ) -> TextEncoder:
    """Loads a local T5 directory holding config.json, safetensors and spiece.model or
    tokenizer.json; a diffusers pipeline root with `text_encoder/` and `tokenizer/` works too."""
    enc_dir, tok_dir = model_dir, model_dir
    if os.path.isdir(os.path.join(model_dir, "text_encoder")):
      enc_dir = os.path.join(model_dir, "text_encoder")
      tok_dir = os.path.join(model_dir, "tokenizer")
      _check_model_dir(enc_dir, need_tokenizer=False)
    else:
      _check_model_dir(model_dir, need_tokenizer=True)
    tokenizer = tok_lib.load_tokenizer(tok_dir, max_length=max_length, overflow=overflow)
    module, params = load_t5_encoder(enc_dir, dtype=dtype)
    return cls(tokenizer, module, params)

  @classmethod
  def offline_demo(
    cls,
    d_model: int = 64,
    max_length: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    overflow: str = "truncate",
  ) -> TextEncoder:
    """Byte tokenizer + a small randomly initialised T5 v1.1-style encoder (no downloads).

    Only for the offline demo: the features are a fixed random function of the bytes.
    """
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}.")
    tokenizer = tok_lib.ByteTokenizer(max_length=max_length, overflow=overflow)
    config = T5Config(
      vocab_size=tokenizer.vocab_size,
      d_model=d_model,
      d_kv=d_model // num_heads,
      d_ff=2 * d_model,
      num_layers=num_layers,
      num_heads=num_heads,
    )
    module = T5Encoder(config)
    ids = jnp.ones((1, max_length), jnp.int32)
    # Threefry keys: the same seed gives the same params on every backend, so the demo encoder
    # needs no checkpoint of its own.
    params = _jitted_init(module)(jax.random.key(seed), ids, ids)
    return cls(tokenizer, module, params)


@functools.cache
def _jitted_init(module: T5Encoder):
  # Cached per (hashable) module so that rebuilding the demo encoder does not recompile.
  return jax.jit(module.init)
