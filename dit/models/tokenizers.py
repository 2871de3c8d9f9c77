"""Tokenizers for the T5 text encoder: prompts -> fixed-length ids and attention mask.

Every tokenizer here follows the Hugging Face T5 scheme: the text's pieces, then EOS, then
pad ids up to `max_length`; a prompt longer than `max_length - 1` pieces is cut and still ends
in EOS (what `tokenizer(..., padding="max_length", truncation=True)` does). The empty prompt is
just EOS; whether a row is the null caption is the caller's `drop` flag, not the tokenizer's.

- `load_tokenizer(model_dir)`: a real T5 tokenizer from `spiece.model` (sentencepiece) or
  `tokenizer.json` (Hugging Face `tokenizers`).
- `ByteTokenizer`: ByT5's scheme (UTF-8 byte + 3; pad 0, eos 1, unk 2), needs no files; used by
  the offline demo.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence

import numpy as np

TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
OVERFLOW_MODES = ("warn", "error", "truncate")


class Tokenizer:
  """Pads/truncates to `max_length`; subclasses supply `_encode` (pieces without specials).

  Attributes:
    max_length: L, the length of every returned row (EOS included).
    overflow: for prompts longer than L tokens: "warn" (truncate and warn), "error"
      (raise ValueError) or "truncate" (silently).
    eos_id, pad_id, vocab_size: ids of the special tokens and the number of ids.
  """

  def __init__(self, max_length: int, overflow: str, eos_id: int, pad_id: int, vocab_size: int):
    if overflow not in OVERFLOW_MODES:
      raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}.")
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}.")
    self.max_length, self.overflow = int(max_length), overflow
    self.eos_id, self.pad_id, self.vocab_size = int(eos_id), int(pad_id), int(vocab_size)

  def _encode(self, prompts: list[str]) -> list[list[int]]:
    raise NotImplementedError

  def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """prompts (B strings; one string counts as B=1) -> (ids (B, L) int32, mask (B, L) int32).

    mask is 1 on the pieces and EOS, 0 on padding.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
      raise TypeError(f"Prompts must be strings; got (index, type) {bad[:5]}.")
    length = self.max_length
    ids = np.full((len(prompts), length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, (prompt, pieces) in enumerate(zip(prompts, self._encode(prompts), strict=True)):
      if len(pieces) + 1 > length:
        self._overflowed(prompt, len(pieces) + 1)
        pieces = pieces[: length - 1]
      ids[row, : len(pieces)] = pieces
      ids[row, len(pieces)] = self.eos_id
      mask[row, : len(pieces) + 1] = 1
    return ids, mask

  def _overflowed(self, prompt: str, num_tokens: int) -> None:
    msg = (
      f"Prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} has {num_tokens} tokens "
      f"(EOS included), more than max_length={self.max_length}"
    )
    if self.overflow == "error":
      raise ValueError(msg + "; shorten it, raise max_length or set overflow='truncate'.")
    if self.overflow == "warn":
      warnings.warn(msg + "; truncated.", stacklevel=3)


class ByteTokenizer(Tokenizer):
  """ByT5 ids: UTF-8 byte b -> b + 3; pad 0, eos 1, unk 2; 259 ids."""

  def __init__(self, max_length: int = 120, overflow: str = "warn"):
    super().__init__(max_length, overflow, eos_id=1, pad_id=0, vocab_size=256 + 3)

  def _encode(self, prompts: list[str]) -> list[list[int]]:
    return [[b + 3 for b in p.encode("utf-8")] for p in prompts]


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (T5's `spiece.model`)."""

  def __init__(self, path: str, max_length: int = 120, overflow: str = "warn"):
    import sentencepiece  # Optional dependency: the `text` extra.

    self.processor = sentencepiece.SentencePieceProcessor(model_file=path)
    eos_id = self.processor.eos_id()
    if eos_id < 0:
      raise ValueError(f"Sentencepiece model {path!r} defines no EOS piece; T5 needs one.")
    # Models trained without a pad piece: any id works, padded positions are masked out.
    pad_id = max(self.processor.pad_id(), 0)
    super().__init__(max_length, overflow, eos_id, pad_id, self.processor.get_piece_size())

  def _encode(self, prompts: list[str]) -> list[list[int]]:
    return self.processor.encode(prompts)


class JsonTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`; EOS/pad names come from `tokenizer_config.json` if present
  (defaults `</s>` and `<pad>`, as in T5)."""

  def __init__(self, path: str, max_length: int = 120, overflow: str = "warn"):
    import tokenizers  # Optional dependency: the `text` extra.

    self.tokenizer = tokenizers.Tokenizer.from_file(path)
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
    names = {"eos_token": "</s>", "pad_token": "<pad>"}
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(config_path):
      with open(config_path) as f:
        config = json.load(f)
      for key in names:
        value = config.get(key) or names[key]
        names[key] = value["content"] if isinstance(value, dict) else value
    special = {key: self.tokenizer.token_to_id(name) for key, name in names.items()}
    absent = [names[key] for key, i in special.items() if i is None]
    if absent:
      raise ValueError(f"Tokenizer {path!r} has no token(s) {absent} in its vocabulary.")
    super().__init__(
      max_length,
      overflow,
      special["eos_token"],
      special["pad_token"],
      self.tokenizer.get_vocab_size(with_added_tokens=True),
    )

  def _encode(self, prompts: list[str]) -> list[list[int]]:
    # Specials are added by `Tokenizer.__call__`, after truncation, so EOS always survives.
    return [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]


def load_tokenizer(model_dir: str, max_length: int = 120, overflow: str = "warn") -> Tokenizer:
  """The tokenizer of a local T5 directory: `spiece.model` if present, else `tokenizer.json`."""
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"Tokenizer directory {model_dir!r} does not exist.")
  spiece = os.path.join(model_dir, "spiece.model")
  if os.path.isfile(spiece):
    return SentencePieceTokenizer(spiece, max_length, overflow)
  json_path = os.path.join(model_dir, "tokenizer.json")
  if os.path.isfile(json_path):
    return JsonTokenizer(json_path, max_length, overflow)
  raise FileNotFoundError(
    f"No tokenizer in {model_dir!r}: expected one of {list(TOKENIZER_FILES)}; "
    f"found {sorted(os.listdir(model_dir))}."
  )
