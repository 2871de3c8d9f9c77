"""DINOv2 in Flax against transformers' Dinov2Model / Dinov2WithRegistersModel (tiny, random)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from dit.models import dinov2

KINDS = {
  "plain": (transformers.Dinov2Model, transformers.Dinov2Config, {}),
  "registers": (transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig, {}),
  "swiglu": (transformers.Dinov2Model, transformers.Dinov2Config, {"use_swiglu_ffn": True}),
}


def _torch_model(kind: str, **overrides):
  """A tiny random float32 reference with every parameter far from its init (position
  embeddings, registers and layer scales O(1)), so that a wrong term shows up."""
  model_cls, config_cls, extra = KINDS[kind]
  kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28)
  config = config_cls(**{**kw, "patch_size": 4, **extra, **overrides})
  torch.manual_seed(0)
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      big = any(k in name for k in ("position_embeddings", "register_tokens", "cls_token"))
      p.copy_(torch.randn_like(p) * (1.0 if big else 0.2) + (1.0 if "lambda1" in name else 0.0))
  return model


def _saved(tmp_path, kind: str, **overrides):
  model = _torch_model(kind, **overrides)
  model.save_pretrained(tmp_path)
  return model, str(tmp_path)


def _torch_outputs(model, images_nhwc):
  with torch.no_grad():
    out = model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2)), output_hidden_states=True)
  return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("size", [28, 20, 36])  # The config's 28, and interpolated grids.
def test_matches_transformers(tmp_path, kind, size):
  model, path = _saved(tmp_path, kind)
  config, params = dinov2.load_dinov2(path)
  assert config.num_register_tokens == (4 if kind == "registers" else 0)
  x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
  want = _torch_outputs(model, x)
  got = jax.jit(lambda p, x: dinov2.Dinov2(config).apply(p, x, output_layer=1))(params, x)
  r = config.num_register_tokens
  n = (size // 4) ** 2
  assert got["patch"].shape == (2, n, 32) and got["cls"].shape == (2, 32)
  last = want.last_hidden_state.numpy()
  np.testing.assert_allclose(got["last_hidden_state"], last, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["cls"], want.pooler_output.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["patch"], last[:, 1 + r :], atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["hidden"], want.hidden_states[1].numpy(), atol=1e-4, rtol=0)
  if r:
    np.testing.assert_allclose(got["registers"], last[:, 1 : 1 + r], atol=1e-4, rtol=0)


def test_hidden_state_of_every_layer(tmp_path):
  model, path = _saved(tmp_path, "registers", num_hidden_layers=3)
  config, params = dinov2.load_dinov2(path)
  x = np.random.RandomState(0).rand(1, 24, 24, 3).astype(np.float32)
  want = _torch_outputs(model, x).hidden_states
  apply = lambda p, x: [
    dinov2.Dinov2(config).apply(p, x, output_layer=k)["hidden"] for k in range(4)
  ]
  for k, got in enumerate(jax.jit(apply)(params, x)):
    np.testing.assert_allclose(got, want[k].numpy(), atol=1e-4, rtol=0, err_msg=f"layer {k}")


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(
  "in_size, out_size", [(4, 7), (7, 4), (37, 16), (16, 37), (256, 224), (8, 224), (28, 3)]
)
def test_bicubic_weights_match_torch_interpolate(in_size, out_size, antialias):
  x = np.random.RandomState(in_size).rand(2, 3, in_size, in_size + 1).astype(np.float32) * 255
  want = torch.nn.functional.interpolate(
    torch.from_numpy(x), size=(out_size, out_size + 2), mode="bicubic", antialias=antialias
  ).numpy()
  got = dinov2.resize_bicubic(
    x.transpose(0, 2, 3, 1), (out_size, out_size + 2), antialias=antialias
  )
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("grid, n", [(37, 16), (4, 7), (4, 2)])
def test_offset_interpolation_is_the_original_dinov2s(grid, n, antialias):
  """interpolate_offset=0.1: facebookresearch/dinov2 (torch.hub) passes scale_factor
  (n + 0.1) / M to F.interpolate; the values differ from size=(n, n) interpolation."""
  rng = np.random.RandomState(n)
  pos = rng.randn(1, 1 + grid * grid, 8).astype(np.float32)
  grid_t = torch.from_numpy(pos[0, 1:].reshape(1, grid, grid, 8)).permute(0, 3, 1, 2)
  sf = (n + 0.1) / grid
  want = torch.nn.functional.interpolate(
    grid_t, scale_factor=(sf, sf), mode="bicubic", antialias=antialias
  )
  want = want.permute(0, 2, 3, 1).reshape(1, n * n, 8).numpy()
  config = dinov2.Dinov2Config(
    hidden_size=8, num_attention_heads=1, image_size=grid, patch_size=1,
    interpolate_offset=0.1, interpolate_antialias=antialias,
  )  # fmt: skip
  got = np.asarray(dinov2.interpolate_pos_embed(jnp.asarray(pos), (n, n), config))
  np.testing.assert_array_equal(got[0, 0], pos[0, 0])  # CLS is not interpolated.
  np.testing.assert_allclose(got[0, 1:], want[0], atol=1e-5, rtol=0)
  plain = dinov2.interpolate_pos_embed(
    jnp.asarray(pos), (n, n), dinov2.Dinov2Config(**{**config.__dict__, "interpolate_offset": 0.0})
  )
  assert np.abs(np.asarray(plain) - got).max() > 1e-2


def test_features_match_the_torch_pipeline_under_jit(tmp_path):
  """features(params, images): [-1, 1] images -> torch bicubic resize (antialiased) ->
  ImageNet normalisation -> the model, under jit with the params as an argument."""
  model, path = _saved(tmp_path, "registers")
  config, params = dinov2.load_dinov2(path)
  images = np.random.RandomState(0).uniform(-1, 1, (3, 30, 30, 3)).astype(np.float32)
  x = torch.from_numpy((images.transpose(0, 3, 1, 2) + 1) / 2)
  x = torch.nn.functional.interpolate(x, size=(24, 24), mode="bicubic", antialias=True)
  mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
  with torch.no_grad():
    want = model((x - mean) / std).last_hidden_state.numpy()
  features = dinov2.make_features(config, resolution=24)
  unit = dinov2.make_features(config, resolution=24, value_range=(0.0, 1.0))
  half = dinov2.make_features(config, resolution=24, dtype=jnp.bfloat16)

  @jax.jit  # One compilation for all the variants.
  def run(p, images):
    grey = images[..., :1]
    return (
      features(p, images),
      unit(p, (images + 1) / 2),
      half(p, images),
      (features(p, grey)["cls"], features(p, jnp.repeat(grey, 3, -1))["cls"]),
    )

  got, same, bf16, (grey, rgb) = run(params, images)
  np.testing.assert_allclose(got["cls"], want[:, 0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["patch"], want[:, 5:], atol=1e-4, rtol=0)
  # [0, 1] inputs with value_range=(0, 1) are the same images.
  np.testing.assert_allclose(same["patch"], got["patch"], atol=1e-5, rtol=0)
  # Grey images are repeated to RGB.
  np.testing.assert_allclose(grey, rgb, atol=1e-6)
  # bf16 compute, float32 params: close, not equal.
  assert bf16["patch"].dtype == jnp.float32
  cos = np.sum(bf16["patch"] * got["patch"], -1) / (
    np.linalg.norm(bf16["patch"], axis=-1) * np.linalg.norm(got["patch"], axis=-1)
  )
  assert cos.min() > 0.99 and np.abs(bf16["patch"] - got["patch"]).max() > 1e-5


def test_save_hf_roundtrip_with_transformers(tmp_path):
  """A Flax-side DINOv2 written by save_hf is read by transformers, with the same outputs."""
  config = dinov2.Dinov2Config(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4,
    qkv_bias=False, use_swiglu_ffn=True, num_register_tokens=2, interpolate_antialias=True,
  )  # fmt: skip
  params = dinov2.init_params(config, seed=1)
  dinov2.save_hf(str(tmp_path), config, params)
  again, loaded = dinov2.load_dinov2(str(tmp_path))
  assert again == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  model = transformers.AutoModel.from_pretrained(str(tmp_path)).eval()
  assert isinstance(model, transformers.Dinov2WithRegistersModel)
  x = np.random.RandomState(0).randn(2, 12, 12, 3).astype(np.float32)
  want = _torch_outputs(model, x).last_hidden_state.numpy()
  got = jax.jit(dinov2.Dinov2(config).apply)(params, x)["last_hidden_state"]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_loads_transformers5_names_and_prefixed_checkpoints(tmp_path):
  """q_proj ... and gate_proj/up_proj/down_proj (transformers 5's in-memory names), a
  `dinov2.` prefix and a classifier head (Dinov2ForImageClassification) all load."""
  _, path = _saved(tmp_path / "ref", "swiglu")
  config, want = dinov2.load_dinov2(path)
  weights = load_file(os.path.join(path, "model.safetensors"))
  renamed = {}
  for key, value in weights.items():
    key = key.replace("attention.attention.query", "attention.q_proj")
    key = key.replace("attention.output.dense", "attention.o_proj")
    key = key.replace("mlp.weights_out", "mlp.down_proj")
    if "mlp.weights_in" in key:
      gate, up = np.split(value, 2)
      renamed["dinov2." + key.replace("weights_in", "gate_proj")] = gate
      renamed["dinov2." + key.replace("weights_in", "up_proj")] = up
      continue
    renamed["dinov2." + key] = value
  renamed["classifier.weight"] = np.zeros((10, 64), np.float32)
  got = dinov2.convert_hf_weights(renamed, config)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("name", ["S/14", "B/14", "L/14", "g/14"])
@pytest.mark.parametrize("registers", [False, True])
def test_presets_have_the_checkpoint_layout(name, registers):
  """The Flax tree of each released size is exactly what the converter fills."""
  config = dinov2.Dinov2Config.preset(name, registers=registers)
  x = jax.ShapeDtypeStruct((1, 518, 518, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: dinov2.Dinov2(config).init(jax.random.key(0), x), x)
  tree = {k: v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}
  table = dinov2._hf_table(config)
  assert len(table) == len(tree)
  for hf_name, (path, shape, how) in table.items():
    if how == "T":
      shape = shape[::-1]
    elif how == "conv":
      shape = (*shape[2:], shape[1], shape[0])
    assert tree[path] == tuple(shape), hf_name
  n = sum(np.prod(s) for s in tree.values())
  # The published sizes: 21M, 86M, 300M, 1.1B (+ 4 registers).
  assert {"S/14": 22e6, "B/14": 86.6e6, "L/14": 304e6, "g/14": 1136e6}[name] == pytest.approx(
    n, rel=0.01
  )
  if name == "g/14":
    assert config.mlp_hidden == 4096  # DINOv2's SwiGLU width for 1536 * 4.


def test_bad_input(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    dinov2.load_dinov2(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match=r"missing \['config.json', 'model.safetensors"):
    dinov2.load_dinov2(str(tmp_path))
  _, path = _saved(tmp_path / "ok", "plain")
  config, params = dinov2.load_dinov2(path)
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  bad = tmp_path / "vit"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({**hf, "model_type": "vit"}))
  shutil.copy(os.path.join(path, "model.safetensors"), bad / "model.safetensors")
  with pytest.raises(ValueError, match="describes a 'vit' model; expected a DINOv2 config"):
    dinov2.load_dinov2(str(bad))
  weights = load_file(os.path.join(path, "model.safetensors"))
  del weights["layernorm.bias"]
  save_file(weights, os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"missing keys \(1\): \['layernorm.bias'\]"):
    dinov2.load_dinov2(path)
  with pytest.raises(ValueError, match="resolution 30 is not a positive multiple of its patch"):
    dinov2.make_features(config, resolution=30)
  with pytest.raises(ValueError, match="input 30x30 is not divisible by its patch size 4"):
    dinov2.make_features(config, resolution=None)(params, jnp.zeros((1, 30, 30, 3)))
  with pytest.raises(ValueError, match=r"output_layer must be in \[0, 2\]"):
    dinov2.make_features(config, output_layer=3)
  with pytest.raises(ValueError, match="must be float32 or bfloat16"):
    dinov2.make_features(config, dtype=jnp.float16)
