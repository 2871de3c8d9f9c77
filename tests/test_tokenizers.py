"""Tokenizers against the Hugging Face T5/ByT5 tokenizers (built offline from tiny models)."""

import json

import numpy as np
import pytest

from dit.models import tokenizers as tok_lib

spm = pytest.importorskip("sentencepiece")

PROMPTS = [
  "a photo of the digit 3",
  "  Handwritten   seven, in ink!",
  "",
  "the quick brown fox jumps over the lazy dog " * 4,  # longer than MAX_LENGTH pieces
]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
  """A tiny T5-style sentencepiece model (pad 0, eos 1, unk 2, no bos) in its own directory."""
  path = tmp_path_factory.mktemp("spiece")
  lines = [f"a photo of the digit {i} written in ink, number {7 * i}" for i in range(10)]
  lines += ["the quick brown fox jumps over the lazy dog", "handwritten zero one two three"]
  (path / "corpus.txt").write_text("\n".join(lines * 5))
  spm.SentencePieceTrainer.train(
    input=str(path / "corpus.txt"),
    model_prefix=str(path / "spiece"),
    vocab_size=48,
    hard_vocab_limit=False,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    minloglevel=2,
  )
  (path / "corpus.txt").unlink()
  (path / "spiece.vocab").unlink()
  return path


def _hf_reference(tokenizer, prompts, max_length):
  out = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length)
  return np.array(out["input_ids"]), np.array(out["attention_mask"])


def test_sentencepiece_matches_hf_t5_tokenizer(spiece_dir):
  transformers = pytest.importorskip("transformers")
  ref = transformers.T5Tokenizer.from_pretrained(str(spiece_dir), extra_ids=0)
  tok = tok_lib.load_tokenizer(str(spiece_dir), max_length=MAX_LENGTH, overflow="truncate")
  assert isinstance(tok, tok_lib.SentencePieceTokenizer)
  ids, mask = tok(PROMPTS)
  ref_ids, ref_mask = _hf_reference(ref, PROMPTS, MAX_LENGTH)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.shape == mask.shape == (len(PROMPTS), MAX_LENGTH)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)
  assert ids[3, -1] == tok.eos_id == 1  # truncated row still ends in EOS


def test_tokenizer_json_matches_sentencepiece(spiece_dir, tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("tokenizers")
  # Hugging Face converts spiece.model into tokenizer.json (+ tokenizer_config.json).
  ref = transformers.T5Tokenizer.from_pretrained(str(spiece_dir), extra_ids=0)
  ref.save_pretrained(str(tmp_path))
  assert not (tmp_path / "spiece.model").exists()
  tok = tok_lib.load_tokenizer(str(tmp_path), max_length=MAX_LENGTH, overflow="truncate")
  assert isinstance(tok, tok_lib.JsonTokenizer)
  ids, mask = tok(PROMPTS)
  sp_ids, sp_mask = tok_lib.load_tokenizer(str(spiece_dir), MAX_LENGTH, "truncate")(PROMPTS)
  np.testing.assert_array_equal(ids, sp_ids)
  np.testing.assert_array_equal(mask, sp_mask)


def test_tokenizer_json_built_with_tokenizers_library(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "digit": 4, "three": 5}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  ids, mask = tok_lib.load_tokenizer(str(tmp_path), max_length=6)(["a digit three", "a cat"])
  np.testing.assert_array_equal(ids, [[3, 4, 5, 1, 0, 0], [3, 2, 1, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])


def test_tokenizer_json_without_eos_token_is_an_error(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<unk>"}))
  with pytest.raises(ValueError, match="</s>"):
    tok_lib.load_tokenizer(str(tmp_path))


def test_byte_tokenizer_matches_hf_byt5():
  transformers = pytest.importorskip("transformers")
  prompts = ["hé 3 ✓", "", "digit eight " * 3]
  ids, mask = tok_lib.ByteTokenizer(max_length=MAX_LENGTH, overflow="truncate")(prompts)
  ref_ids, ref_mask = _hf_reference(transformers.ByT5Tokenizer(), prompts, MAX_LENGTH)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)


def test_empty_prompt_is_just_eos():
  ids, mask = tok_lib.ByteTokenizer(max_length=4)([""])
  np.testing.assert_array_equal(ids, [[1, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0]])


def test_single_string_is_a_batch_of_one():
  ids, _ = tok_lib.ByteTokenizer(max_length=4)("ab")
  np.testing.assert_array_equal(ids, [[ord("a") + 3, ord("b") + 3, 1, 0]])


def test_overflow_modes():
  long = "x" * 10
  with pytest.warns(UserWarning, match="11 tokens.*max_length=5"):
    ids, mask = tok_lib.ByteTokenizer(max_length=5, overflow="warn")([long, "ok"])
  np.testing.assert_array_equal(ids[0], [ord("x") + 3] * 4 + [1])
  assert mask.sum(axis=1).tolist() == [5, 3]
  with pytest.raises(ValueError, match="11 tokens.*max_length=5"):
    tok_lib.ByteTokenizer(max_length=5, overflow="error")(["ok", long])
  # Exactly max_length tokens (EOS included) is not an overflow.
  tok_lib.ByteTokenizer(max_length=5, overflow="error")(["x" * 4])


def test_overflow_truncate_is_silent(recwarn):
  tok_lib.ByteTokenizer(max_length=3, overflow="truncate")(["abcdef"])
  assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_bad_arguments():
  with pytest.raises(ValueError, match="overflow must be one of"):
    tok_lib.ByteTokenizer(overflow="clip")
  with pytest.raises(ValueError, match="max_length must be >= 1"):
    tok_lib.ByteTokenizer(max_length=0)
  with pytest.raises(TypeError, match="strings"):
    tok_lib.ByteTokenizer()(["ok", 3])


def test_missing_tokenizer_files(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"spiece.model.*tokenizer.json.*config.json"):
    tok_lib.load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tok_lib.load_tokenizer(str(tmp_path / "nope"))
