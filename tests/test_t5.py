"""T5 encoder: float32 parity with transformers' T5EncoderModel, loading and its errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.models import t5
from dit.models import tokenizers as tok_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

TINY = dict(
  vocab_size=64,
  d_model=32,
  d_kv=8,
  d_ff=48,
  num_layers=2,
  num_heads=4,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=16,
  tie_word_embeddings=False,
  dropout_rate=0.0,
)


def _save_tiny(path, feed_forward_proj="gated-gelu", seed=0, **save_kw):
  torch.manual_seed(seed)
  config = transformers.T5Config(feed_forward_proj=feed_forward_proj, **TINY)
  model = transformers.T5EncoderModel(config).eval()
  model.save_pretrained(str(path), **save_kw)
  return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("t5_single")
  return path, _save_tiny(path)


def _inputs(batch=3, length=20, seed=1):
  """Random ids with right padding: rows hold `length`, 7 and 1 real tokens."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, TINY["vocab_size"], (batch, length)).astype(np.int32)
  lengths = [length, 7, 1][:batch]
  mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int32)
  return np.where(mask > 0, ids, 0).astype(np.int32), mask


def _torch_out(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
  return out.last_hidden_state.numpy()


def _check_parity(model_dir, model):
  module, params = t5.load_t5_encoder(str(model_dir))
  ids, mask = _inputs()
  out = np.asarray(jax.jit(module.apply)(params, ids, mask))
  ref = _torch_out(model, ids, mask)
  assert out.shape == ref.shape == (3, 20, TINY["d_model"])
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)  # padded positions included


def test_parity_single_file(tiny_dir):
  _check_parity(*tiny_dir)


def test_parity_sharded(tmp_path):
  model = _save_tiny(tmp_path, seed=2, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
  _check_parity(tmp_path, model)


def test_parity_relu_v10_ffn(tmp_path):
  _check_parity(tmp_path, _save_tiny(tmp_path, feed_forward_proj="relu", seed=3))


def test_parity_full_seq2seq_checkpoint(tmp_path):
  """A T5ForConditionalGeneration checkpoint: decoder and lm_head are dropped on load."""
  torch.manual_seed(4)
  config = transformers.T5Config(feed_forward_proj="gated-gelu", **TINY)
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.save_pretrained(str(tmp_path))
  module, params = t5.load_t5_encoder(str(tmp_path))
  ids, mask = _inputs()
  with torch.no_grad():
    ref = model.encoder(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)
    )
  out = np.asarray(module.apply(params, ids, mask))
  np.testing.assert_allclose(out, ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)


def test_relative_position_buckets_match_reference():
  bucket_fn = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for num_buckets, max_distance in [(32, 128), (8, 16)]:
    ours = t5.relative_position_buckets(300, 300, num_buckets, max_distance)
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    ref = bucket_fn(rel, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_bfloat16_load_is_close(tiny_dir):
  model_dir, model = tiny_dir
  module, params = t5.load_t5_encoder(str(model_dir), dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  ids, mask = _inputs()
  out = module.apply(params, ids, mask)
  assert out.dtype == jnp.bfloat16
  ref = _torch_out(model, ids, mask)
  # Final RMSNorm output has unit RMS; bf16 keeps ~3 significant digits through 2 layers.
  assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1


def test_config_from_dict_and_presets():
  hf = transformers.T5Config(feed_forward_proj="gated-gelu", **TINY).to_dict()
  config = t5.T5Config.from_dict(hf)
  assert (config.d_model, config.d_ff, config.num_layers, config.num_heads) == (32, 48, 2, 4)
  assert config.is_gated_act and config.dense_act_fn == "gelu_new"
  assert t5.T5Config.from_dict({**hf, "feed_forward_proj": "relu"}).is_gated_act is False
  # T5 v1.1 XXL encoder (PixArt's text encoder): 4,762,310,656 parameters.
  xxl = t5.T5Encoder(t5.T5Config.preset("xxl"))
  shapes = jax.eval_shape(xxl.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  assert sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)) == 4_762_310_656
  with pytest.raises(ValueError, match="Unknown T5 v1.1 preset 'xxxl'"):
    t5.T5Config.preset("xxxl")
  with pytest.raises(ValueError, match="model_type 't5' or 'mt5'.*'bert'"):
    t5.T5Config.from_dict({**hf, "model_type": "bert"})
  with pytest.raises(ValueError, match="Unsupported T5 activation 'swish2'"):
    t5.T5Config.from_dict({**hf, "feed_forward_proj": "gated-swish2"})


def test_missing_files_are_listed(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config.json.*model.safetensors"):
    t5.load_t5_encoder(str(tmp_path))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"missing \['model.safetensors"):
    t5.load_t5_encoder(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"spiece.model or tokenizer.json"):
    t5.TextEncoder.from_pretrained(str(tmp_path))


def test_missing_shard_is_named(tmp_path):
  _save_tiny(tmp_path, max_shard_size="20KB")
  shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=shard.name):
    t5.load_t5_encoder(str(tmp_path))


def _rewrite(model_dir, key, value):
  path = os.path.join(model_dir, "model.safetensors")
  weights = safetensors_numpy.load_file(path)
  if value is None:
    del weights[key]
  else:
    weights[key] = value
  safetensors_numpy.save_file(weights, path)


def test_bad_tensors_are_named(tmp_path):
  _save_tiny(tmp_path)
  key = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
  _rewrite(tmp_path, key, np.zeros((48, 31), np.float32))
  with pytest.raises(ValueError, match=rf"{key}: expected \(48, 32\), got \(48, 31\)"):
    t5.load_t5_encoder(str(tmp_path))
  _rewrite(tmp_path, key, np.zeros((48, 32), np.int32))
  with pytest.raises(ValueError, match=rf"non-float.*{key}: int32"):
    t5.load_t5_encoder(str(tmp_path))
  _rewrite(tmp_path, key, None)
  with pytest.raises(ValueError, match=rf"missing keys.*{key}"):
    t5.load_t5_encoder(str(tmp_path))


def test_config_mismatch_names_tensor(tmp_path):
  _save_tiny(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "d_ff": 40}))
  with pytest.raises(ValueError, match=r"DenseReluDense.wo.weight: expected \(32, 40\)"):
    t5.load_t5_encoder(str(tmp_path))


@pytest.mark.parametrize("layout", ["flat", "pipeline"])
def test_text_encoder_from_pretrained(tiny_dir, tmp_path, layout):
  """A T5 directory with tokenizer.json, or a diffusers root with text_encoder/ + tokenizer/."""
  tokenizers = pytest.importorskip("tokenizers")
  model_dir, model = tiny_dir
  enc_dir = tmp_path if layout == "flat" else tmp_path / "text_encoder"
  tok_dir = tmp_path if layout == "flat" else tmp_path / "tokenizer"
  enc_dir.mkdir(exist_ok=True)
  tok_dir.mkdir(exist_ok=True)
  for name in os.listdir(model_dir):
    (enc_dir / name).write_bytes((model_dir / name).read_bytes())
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "digit": 4, "three": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tok_dir / "tokenizer.json"))
  encoder = t5.TextEncoder.from_pretrained(str(tmp_path), max_length=8)
  emb, mask = encoder.encode(["a digit three", ""])
  assert emb.shape == (2, 8, 32) and emb.dtype == jnp.float32 and encoder.dim == 32
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
  ids = np.array([[3, 4, 5, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], np.int32)
  ref = _torch_out(model, ids, np.array(mask))
  np.testing.assert_allclose(np.asarray(emb), ref, atol=1e-4, rtol=0)


def test_text_encoder_rejects_tokenizer_larger_than_vocab(tiny_dir):
  module, params = t5.load_t5_encoder(str(tiny_dir[0]))
  with pytest.raises(ValueError, match="259 ids but the encoder embeds only 64"):
    t5.TextEncoder(tok_lib.ByteTokenizer(), module, params)


def test_offline_demo():
  encoder = t5.TextEncoder.offline_demo(d_model=32, max_length=24, seed=0)
  emb, mask = encoder.encode(["the digit 3", "the digit 4", "the digit 3"])
  assert emb.shape == (3, 24, 32) and mask.shape == (3, 24) and encoder.dim == 32
  assert np.asarray(mask).sum(axis=1).tolist() == [12, 12, 12]
  emb = np.asarray(emb)
  np.testing.assert_array_equal(emb[0], emb[2])
  assert np.abs(emb[0, :12] - emb[1, :12]).max() > 1e-2
  # Final RMSNorm with unit scale: every real token has unit RMS.
  np.testing.assert_allclose(np.sqrt((emb[0, :12] ** 2).mean(-1)), 1.0, rtol=1e-3)
  # The demo encoder is not checkpointed: the seed alone must rebuild the same params.
  again = t5.TextEncoder.offline_demo(d_model=32, max_length=24, seed=0)
  jax.tree.map(np.testing.assert_array_equal, encoder.params, again.params)
