"""Captions -> T5 embeddings, for the input pipeline and the sampler alike.

`config.text` (the t2i configs share it with `config.data.text`) names the encoder:

  t5_path       local T5 directory (config.json, safetensors, spiece.model or tokenizer.json)
                or a diffusers pipeline root; "" = the offline demo encoder
                (`TextEncoder.offline_demo`: byte tokenizer + a small random T5, no files)
  max_length    L, tokens per caption, EOS included (= config.model.caption_length)
  overflow      longer prompts: "warn" (truncate, warn), "error" or "truncate" (silently)
  demo_dim, demo_layers, demo_heads, demo_seed   the offline demo encoder; the same values
                rebuild the same encoder, so a checkpoint needs no copy of it

Training with few distinct captions (captioned digits) embeds each distinct caption once:
`CaptionEmbedder` keeps a caption -> (emb, mask) table and the pipeline only gathers rows.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

TEXT_DEFAULTS = dict(
  t5_path="",
  max_length=32,
  overflow="warn",
  dtype="float32",
  demo_dim=64,
  demo_layers=2,
  demo_heads=4,
  demo_seed=0,
)


def text_settings(text_config: Any) -> tuple:
  """The encoder-defining fields of `config.text` as a hashable tuple (defaults filled in)."""
  get = text_config.get
  return tuple((k, get(k, v)) for k, v in TEXT_DEFAULTS.items())


def make_text_encoder(text_config: Any):
  """The `dit.models.t5.TextEncoder` named by `config.text` (built once per setting)."""
  return _make_text_encoder(text_settings(text_config))


@functools.lru_cache(maxsize=4)
def _make_text_encoder(settings: tuple):
  import jax.numpy as jnp  # Lazy: pipelines without text need no JAX here.

  from dit.models.t5 import TextEncoder

  s = dict(settings)
  if s["t5_path"]:
    return TextEncoder.from_pretrained(
      s["t5_path"], max_length=s["max_length"], dtype=jnp.dtype(s["dtype"]), overflow=s["overflow"]
    )
  return TextEncoder.offline_demo(
    d_model=s["demo_dim"],
    max_length=s["max_length"],
    num_layers=s["demo_layers"],
    num_heads=s["demo_heads"],
    seed=s["demo_seed"],
    overflow=s["overflow"],
  )


class CaptionEmbedder:
  """Captions (B,) -> (emb (B, L, D) float32, mask (B, L) int32), NumPy, cached per caption.

  Thread-safe; a caption is encoded once, the first time it is seen (or in `prefill`).
  """

  def __init__(self, encoder: Any, chunk: int = 256):
    self.encoder = encoder
    self.chunk = chunk
    self._table: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._table)

  def prefill(self, captions: Iterable[str]) -> None:
    """Encodes the captions not yet in the table, `chunk` at a time."""
    with self._lock:
      new = sorted({str(c) for c in captions} - set(self._table))
      for start in range(0, len(new), self.chunk):
        part = new[start : start + self.chunk]
        emb, mask = self.encoder.encode(part)
        emb, mask = np.asarray(emb, np.float32), np.asarray(mask, np.int32)
        for i, caption in enumerate(part):
          self._table[caption] = (emb[i], mask[i])

  def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    captions = [str(c) for c in captions]
    if any(c not in self._table for c in captions):
      self.prefill(captions)
    emb = np.stack([self._table[c][0] for c in captions])
    mask = np.stack([self._table[c][1] for c in captions])
    return emb, mask
