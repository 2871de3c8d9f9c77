"""The converters (dit/models/convert.py) and the converted models.

Without torch (a core install): random state dicts in the official DiT, diffusers DiT and
diffusers PixArt layouts, written from a table of their PyTorch names and shapes here, are
converted; every Linear weight (square ones included) must arrive transposed, the patch
convolution as the equivalent (p p C, D) matrix, the rest unchanged, and the converted DiT
must compute what tests/numpy_dit.py computes on the same weights.

With the torch extra: parity of dit.models.dit.DiT with diffusers' DiT and PixArt (float32,
CPU): tiny random PyTorch models are built, converted and run on the same inputs.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpy_dit
import pytest
from conftest import ROOT
from flax import traverse_util

from dit.cli import UserError
from dit.diffusion import flow_samplers
from dit.models import convert
from dit.models.dit import DiT, sincos_pos_embed_2d

try:
  import diffusers
  import torch
except ImportError:  # The core install: the torch-free tests still run.
  torch = diffusers = None

needs_torch = pytest.mark.skipif(
  torch is None, reason="parity with diffusers needs the torch extra (pip install 'dit[torch]')"
)

TOL = 1e-5
B, S, C = 3, 8, 4

# ---- Without torch: the layouts, from their PyTorch names ------------------------------------

D, P = 32, 2  # Hidden size 32: attn.proj, t_embedder.mlp.2, attn2.to_q, ... are square.


def _linear(torch_name, flax_path, out_features, in_features):
  return {torch_name: (flax_path, (out_features, in_features))}


def official_layout(depth=2, c=C):
  """{torch Linear name: (Flax path, torch weight shape (out, in))} of the official DiT."""
  out = P * P * 2 * c
  table = {
    **_linear("t_embedder.mlp.0", "t_embedder/mlp_0", D, 256),
    **_linear("t_embedder.mlp.2", "t_embedder/mlp_2", D, D),
    **_linear("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation_1", 2 * D, D),
    **_linear("final_layer.linear", "final_layer/linear", out, D),
  }
  for i in range(depth):
    table.update(_linear(f"blocks.{i}.attn.qkv", f"blocks_{i}/attn/qkv", 3 * D, D))
    table.update(_linear(f"blocks.{i}.attn.proj", f"blocks_{i}/attn/proj", D, D))
    table.update(_linear(f"blocks.{i}.mlp.fc1", f"blocks_{i}/mlp/fc1", 4 * D, D))
    table.update(_linear(f"blocks.{i}.mlp.fc2", f"blocks_{i}/mlp/fc2", D, 4 * D))
    table.update(
      _linear(f"blocks.{i}.adaLN_modulation.1", f"blocks_{i}/adaLN_modulation_1", 6 * D, D)
    )
  return table


def random_state_dict(linears, others, seed=0):
  """Random weights and biases for `linears`, random tensors of the shapes in `others`."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, (_, (out_f, in_f)) in linears.items():
    sd[f"{name}.weight"] = (0.1 * rng.standard_normal((out_f, in_f))).astype(np.float32)
    sd[f"{name}.bias"] = (0.1 * rng.standard_normal(out_f)).astype(np.float32)
  for name, shape in others.items():
    sd[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return sd


def _conv_patches(x, weight, bias):
  """torch Conv2d(C, D, kernel p, stride p) on NHWC x, by its definition -> (B, N, D)."""
  b, h, w, c = x.shape
  p = weight.shape[-1]
  blocks = x.reshape(b, h // p, p, w // p, p, c)
  out = np.einsum("biujvc,dcuv->bijd", blocks, weight) + bias
  return out.reshape(b, -1, weight.shape[0])


def check_linears(params, sd, linears, fused=None):
  """Every torch Linear arrives as kernel = weight.T, bias = bias (fused: {Flax path: the
  torch names concatenated along the output, e.g. to_q, to_k, to_v -> qkv})."""
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  squares = 0
  for name, (path, (out_f, in_f)) in linears.items():
    w = sd[f"{name}.weight"]
    squares += out_f == in_f
    kernel, bias = flat[f"{path}/kernel"], flat[f"{path}/bias"]
    if fused and path in fused:
      i = fused[path].index(name)
      kernel, bias = kernel[:, i * out_f : (i + 1) * out_f], bias[i * out_f : (i + 1) * out_f]
    assert kernel.shape == (in_f, out_f), (name, kernel.shape)
    np.testing.assert_array_equal(kernel, w.T, err_msg=name)
    np.testing.assert_array_equal(bias, sd[f"{name}.bias"], err_msg=name)
  assert squares >= 2  # Square kernels are where a missing transpose keeps the shape.
  return flat


def test_official_layout_converts_without_torch():
  linears = official_layout()
  others = {
    "x_embedder.proj.weight": (D, C, P, P),
    "x_embedder.proj.bias": (D,),
    "y_embedder.embedding_table.weight": (11, D),
    "pos_embed": (1, 16, D),
  }
  sd = random_state_dict(linears, others)
  params, kwargs = convert.dit_params_from_state_dict(sd, "random", num_heads=2)
  assert kwargs == dict(
    input_size=S, patch_size=P, in_channels=C, hidden_size=D, depth=2, num_heads=2,
    num_classes=10, learn_sigma=True, block="adaln_zero",
  )  # fmt: skip
  flat = check_linears(params, sd, linears)
  for name in ("blocks.0.attn.proj.weight", "t_embedder.mlp.2.weight"):
    assert sd[name].shape == (D, D) and np.abs(sd[name] - sd[name].T).max() > 0.1
  np.testing.assert_array_equal(
    flat["y_embedder/embedding"], sd["y_embedder.embedding_table.weight"]
  )
  # The patch convolution becomes the matrix on numpy_dit's (row, column, channel) patches.
  x = np.random.default_rng(1).standard_normal((2, S, S, C))
  want = _conv_patches(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"])
  got = numpy_dit.patchify(x, P) @ flat["x_embedder/kernel"] + flat["x_embedder/bias"]
  np.testing.assert_allclose(got, want, atol=1e-12)
  # And the converted model computes the reference DiT on those weights.
  t = np.array([0.0, 371.0], np.float32)
  cond = {"label": np.array([3, 9])}
  out = DiT(**kwargs).apply({"params": params}, jnp.asarray(x, jnp.float32), t, cond)
  ref = numpy_dit.forward(params, kwargs, x.astype(np.float32), t, cond)
  np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)


def _block_linears(i, d, cross):
  """diffusers BasicTransformerBlock i: {torch name: (Flax path, (out, in))}."""
  t, f = f"transformer_blocks.{i}", f"blocks_{i}"
  table = {}
  for n in "qkv":
    table.update(_linear(f"{t}.attn1.to_{n}", f"{f}/attn/qkv", d, d))
  table.update(_linear(f"{t}.attn1.to_out.0", f"{f}/attn/proj", d, d))
  if cross:
    table.update(_linear(f"{t}.attn2.to_q", f"{f}/cross_attn/q_linear", d, d))
    for n in "kv":
      table.update(_linear(f"{t}.attn2.to_{n}", f"{f}/cross_attn/kv_linear", d, d))
    table.update(_linear(f"{t}.attn2.to_out.0", f"{f}/cross_attn/proj", d, d))
  table.update(_linear(f"{t}.ff.net.0.proj", f"{f}/mlp/fc1", 4 * d, d))
  table.update(_linear(f"{t}.ff.net.2", f"{f}/mlp/fc2", d, 4 * d))
  return table


def _fused(depth, cross):
  fused = {}
  for i in range(depth):
    t = f"transformer_blocks.{i}"
    fused[f"blocks_{i}/attn/qkv"] = [f"{t}.attn1.to_{n}" for n in "qkv"]
    if cross:
      fused[f"blocks_{i}/cross_attn/kv_linear"] = [f"{t}.attn2.to_{n}" for n in "kv"]
  return fused


def test_diffusers_dit_layout_converts_without_torch():
  depth, emb = 2, "transformer_blocks.0.norm1.emb"
  linears = {
    **_linear(f"{emb}.timestep_embedder.linear_1", "t_embedder/mlp_0", D, 256),
    **_linear(f"{emb}.timestep_embedder.linear_2", "t_embedder/mlp_2", D, D),
    **_linear("proj_out_1", "final_layer/adaLN_modulation_1", 2 * D, D),
    **_linear("proj_out_2", "final_layer/linear", P * P * 2 * C, D),
  }
  for i in range(depth):
    linears.update(_block_linears(i, D, cross=False))
    linears.update(
      _linear(f"transformer_blocks.{i}.norm1.linear", f"blocks_{i}/adaLN_modulation_1", 6 * D, D)
    )
  others = {
    "pos_embed.proj.weight": (D, C, P, P),
    "pos_embed.proj.bias": (D,),
    f"{emb}.class_embedder.embedding_table.weight": (11, D),
  }
  sd = random_state_dict(linears, others, seed=2)
  for k in [k for k in sd if k.startswith(emb)]:  # diffusers' per-block embedder copies.
    sd[k.replace("blocks.0.", "blocks.1.", 1)] = sd[k]
  cfg = dict(
    in_channels=C, out_channels=2 * C, sample_size=S, patch_size=P, num_attention_heads=2,
    attention_head_dim=D // 2, num_layers=depth, num_embeds_ada_norm=10,
    norm_type="ada_norm_zero",
  )  # fmt: skip
  params, kwargs = convert.diffusers_dit_params(sd, cfg, "random")
  assert kwargs["time_freq_shift"] == 1.0 and kwargs["hidden_size"] == D
  flat = check_linears(params, sd, linears, _fused(depth, cross=False))
  np.testing.assert_array_equal(
    flat["y_embedder/embedding"], sd[f"{emb}.class_embedder.embedding_table.weight"]
  )
  x = np.random.default_rng(3).standard_normal((2, S, S, C)).astype(np.float32)
  want = _conv_patches(x, sd["pos_embed.proj.weight"], sd["pos_embed.proj.bias"])
  got = numpy_dit.patchify(x, P) @ flat["x_embedder/kernel"] + flat["x_embedder/bias"]
  np.testing.assert_allclose(got, want, atol=1e-6)
  t, cond = np.array([5.0, 999.0], np.float32), {"label": np.array([0, 9])}
  out = DiT(**kwargs).apply({"params": params}, x, t, cond)
  np.testing.assert_allclose(out, numpy_dit.forward(params, kwargs, x, t, cond), atol=2e-4)


def test_pixart_layout_converts_without_torch():
  depth, d, cc, emb = 2, 48, 24, "adaln_single.emb"
  linears = {
    **_linear(f"{emb}.timestep_embedder.linear_1", "t_embedder/mlp_0", d, 256),
    **_linear(f"{emb}.timestep_embedder.linear_2", "t_embedder/mlp_2", d, d),
    **_linear("adaln_single.linear", "t_block_1", 6 * d, d),
    **_linear("caption_projection.linear_1", "y_proj/fc1", d, cc),
    **_linear("caption_projection.linear_2", "y_proj/fc2", d, d),
    **_linear("proj_out", "final_layer/linear", P * P * 2 * C, d),
  }
  for name in ("resolution", "aspect_ratio"):
    linears.update(
      _linear(f"{emb}.{name}_embedder.linear_1", f"{name}_embedder/mlp_0", d // 3, 256)
    )
    linears.update(
      _linear(f"{emb}.{name}_embedder.linear_2", f"{name}_embedder/mlp_2", d // 3, d // 3)
    )
  others = {"pos_embed.proj.weight": (d, C, P, P), "pos_embed.proj.bias": (d,)}
  others["scale_shift_table"] = (2, d)
  for i in range(depth):
    linears.update(_block_linears(i, d, cross=True))
    others[f"transformer_blocks.{i}.scale_shift_table"] = (6, d)
  sd = random_state_dict(linears, others, seed=4)
  cfg = dict(
    in_channels=C, out_channels=2 * C, sample_size=S, patch_size=P, num_attention_heads=3,
    attention_head_dim=d // 3, num_layers=depth, caption_channels=cc, cross_attention_dim=d,
    use_additional_conditions=True, interpolation_scale=2, norm_type="ada_norm_single",
  )  # fmt: skip
  null = np.random.default_rng(5).standard_normal((6, cc)).astype(np.float32)
  params, kwargs = convert.pixart_params(sd, cfg, "random", null_caption=null)
  assert kwargs["size_conditioning"] and kwargs["pe_interpolation"] == 2.0
  flat = check_linears(params, sd, linears, _fused(depth, cross=True))
  for name, shape in others.items():
    if name.endswith("scale_shift_table"):
      path = name.replace("transformer_blocks.", "blocks_").replace(".", "/")
      path = path if path.startswith("blocks_") else f"final_layer/{path}"
      assert flat[path].shape == shape
      np.testing.assert_array_equal(flat[path], sd[name])
  np.testing.assert_array_equal(flat["y_embedding"], null)
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, S, S, C)).astype(np.float32)
  t = np.array([5.0, 999.0], np.float32)
  cond = {
    "text": rng.standard_normal((2, 6, cc)).astype(np.float32),
    "text_mask": np.array([[1, 1, 1, 0, 0, 0], [1] * 6], np.int32),
    "drop": np.array([False, True]),
    "resolution": np.array([[512, 512], [1024, 768]], np.float32),
    "aspect_ratio": np.array([[1.0], [0.75]], np.float32),
  }
  out = DiT(**kwargs).apply({"params": params}, x, t, cond)
  np.testing.assert_allclose(out, numpy_dit.forward(params, kwargs, x, t, cond), atol=2e-4)


# ---- With torch: parity with diffusers ----------------------------------------------------------


def _randomize(model, seed=0, std=0.1):
  """diffusers zero-inits some layers; random everything so that every weight matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * std)
  return model.eval()


def _inputs(seed=0, length=6, width=24):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, S, S, C)).astype(np.float32)
  t = np.array([0.0, 371.0, 999.0], np.float32)
  labels = np.array([1, 7, 3])
  text = rng.standard_normal((B, length, width)).astype(np.float32)
  mask = np.ones((B, length), np.int64)
  mask[0, 3:] = 0
  mask[2, 1:] = 0
  return x, t, labels, text, mask


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _run(kwargs, params, x, t, cond):
  apply = jax.jit(DiT(**kwargs).apply)
  out = apply({"params": params}, jnp.asarray(x), jnp.asarray(t), cond)
  return np.asarray(out).transpose(0, 3, 1, 2)


def _tiny_diffusers_dit():
  model = diffusers.DiTTransformer2DModel(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=C,
    out_channels=2 * C,
    num_layers=2,
    sample_size=S,
    patch_size=2,
    num_embeds_ada_norm=10,
    norm_eps=1e-6,  # The original DiT (and this DiT) uses 1e-6 in every LayerNorm.
  )
  _randomize(model)
  # diffusers keeps one timestep/label embedder per block; the original DiT shares one.
  with torch.no_grad():
    emb0 = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(emb0.state_dict())
  return model


@needs_torch
def test_diffusers_dit_parity(tmp_path):
  model = _tiny_diffusers_dit()
  model.save_pretrained(tmp_path, safe_serialization=True)
  params, kwargs = convert.convert_diffusers_dit(str(tmp_path))
  assert kwargs["learn_sigma"] and kwargs["num_classes"] == 10
  x, t, labels, _, _ = _inputs()
  with torch.no_grad():
    ref = model(_nchw(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(labels))
    ref_null = model(_nchw(x), timestep=torch.from_numpy(t), class_labels=torch.full((B,), 10))
  out = _run(kwargs, params, x, t, {"label": jnp.asarray(labels)})
  np.testing.assert_allclose(out, ref.sample.numpy(), atol=TOL, rtol=0)
  # CFG's unconditional rows: "drop" selects the null label whatever "label" says.
  drop = {"label": jnp.asarray(labels), "drop": jnp.ones((B,), bool)}
  out_null = _run(kwargs, params, x, t, drop)
  np.testing.assert_allclose(out_null, ref_null.sample.numpy(), atol=TOL, rtol=0)
  assert np.abs(out - out_null).max() > 1e-3


def _official_state_dict(model):
  """The diffusers DiT weights rewritten in the official DiT release's key layout."""
  sd = _state(model)
  out = {
    "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
    "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
    "pos_embed": model.pos_embed.pos_embed.numpy(),
    "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
    "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
    "final_layer.linear.weight": sd["proj_out_2.weight"],
    "final_layer.linear.bias": sd["proj_out_2.bias"],
  }
  emb = "transformer_blocks.0.norm1.emb"
  for name, src in [("mlp.0", "linear_1"), ("mlp.2", "linear_2")]:
    for p in ("weight", "bias"):
      out[f"t_embedder.{name}.{p}"] = sd[f"{emb}.timestep_embedder.{src}.{p}"]
  out["y_embedder.embedding_table.weight"] = sd[f"{emb}.class_embedder.embedding_table.weight"]
  for i in range(len(model.transformer_blocks)):
    t = f"transformer_blocks.{i}"
    for p in ("weight", "bias"):
      qkv = [sd[f"{t}.attn1.to_{n}.{p}"] for n in "qkv"]
      out[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate(qkv, axis=0)
      out[f"blocks.{i}.attn.proj.{p}"] = sd[f"{t}.attn1.to_out.0.{p}"]
      out[f"blocks.{i}.mlp.fc1.{p}"] = sd[f"{t}.ff.net.0.proj.{p}"]
      out[f"blocks.{i}.mlp.fc2.{p}"] = sd[f"{t}.ff.net.2.{p}"]
      out[f"blocks.{i}.adaLN_modulation.1.{p}"] = sd[f"{t}.norm1.linear.{p}"]
  return out


@needs_torch
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_official_dit_checkpoint(tmp_path, fmt):
  model = _tiny_diffusers_dit()
  sd = _official_state_dict(model)
  path = str(tmp_path / f"DiT-tiny.{fmt}")
  from safetensors.torch import save_file

  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
  if fmt == "pt":
    torch.save(tensors, path)
  else:
    save_file(tensors, path)
  params, kwargs = convert.convert_dit_checkpoint(path, num_heads=2)
  assert kwargs == dict(
    input_size=S, patch_size=2, in_channels=C, hidden_size=32, depth=2, num_heads=2,
    num_classes=10, learn_sigma=True, block="adaln_zero",
  )  # fmt: skip
  # The official DiT's position table is what the model computes.
  np.testing.assert_allclose(
    sincos_pos_embed_2d(32, 4, 4, base_size=4), sd["pos_embed"][0], atol=1e-6
  )
  x, t, labels, _, _ = _inputs(1)
  with torch.no_grad():
    ref = model(_nchw(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(labels))
  # Only diffusers' timestep sinusoid differs from the original (downscale_freq_shift=1).
  out = _run({**kwargs, "time_freq_shift": 1.0}, params, x, t, {"label": jnp.asarray(labels)})
  np.testing.assert_allclose(out, ref.sample.numpy(), atol=TOL, rtol=0)


@needs_torch
def test_official_checkpoint_errors(tmp_path):
  model = _tiny_diffusers_dit()
  sd = _official_state_dict(model)
  del sd["blocks.1.mlp.fc2.bias"]
  sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:, :-1]
  sd["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    convert.dit_params_from_state_dict(sd, "tiny")
  msg = str(e.value)
  assert "blocks.1.mlp.fc2.bias" in msg and "extra.weight" in msg
  assert "blocks.0.attn.qkv.weight: expected (96, 32), got (96, 31)" in msg
  with pytest.raises(ValueError, match="not in the official DiT layout"):
    convert.dit_params_from_state_dict({"foo": np.zeros(1)}, "tiny")
  with pytest.raises(FileNotFoundError):
    convert.convert_dit_checkpoint(str(tmp_path / "nope.pt"))


def _tiny_pixart(additional: bool, interpolation=None):
  model = diffusers.PixArtTransformer2DModel(
    num_attention_heads=3,
    attention_head_dim=16,
    in_channels=C,
    out_channels=2 * C,
    num_layers=2,
    sample_size=S,
    patch_size=2,
    cross_attention_dim=48,
    caption_channels=24,
    use_additional_conditions=additional,
    interpolation_scale=interpolation,
  )
  return _randomize(model, seed=1)


@needs_torch
@pytest.mark.parametrize("additional,interpolation", [(False, None), (True, 2)])
def test_diffusers_pixart_parity(tmp_path, additional, interpolation):
  model = _tiny_pixart(additional, interpolation)
  model.save_pretrained(tmp_path, safe_serialization=True)
  params, kwargs = convert.convert_pixart(str(tmp_path))
  assert kwargs["block"] == "adaln_single" and kwargs["size_conditioning"] == additional
  x, t, _, text, mask = _inputs(2)
  added = {"resolution": None, "aspect_ratio": None}
  cond = {"text": jnp.asarray(text)}
  if additional:
    res = np.array([[512, 512], [1024, 768], [256, 1024]], np.float32)
    ar = (res[:, :1] / res[:, 1:]).astype(np.float32)
    added = {"resolution": torch.from_numpy(res), "aspect_ratio": torch.from_numpy(ar)}
    cond.update(resolution=jnp.asarray(res), aspect_ratio=jnp.asarray(ar))

  def ref(m):
    with torch.no_grad():
      return model(
        _nchw(x),
        encoder_hidden_states=torch.from_numpy(text),
        timestep=torch.from_numpy(t),
        encoder_attention_mask=None if m is None else torch.from_numpy(m),
        added_cond_kwargs=added,
      ).sample.numpy()

  out = _run(kwargs, params, x, t, cond)
  np.testing.assert_allclose(out, ref(None), atol=TOL, rtol=0)
  out_masked = _run(kwargs, params, x, t, {**cond, "text_mask": jnp.asarray(mask)})
  np.testing.assert_allclose(out_masked, ref(mask), atol=TOL, rtol=0)
  assert np.abs(out - out_masked).max() > 1e-3


@needs_torch
def test_pixart_null_caption(tmp_path):
  """With a supplied null caption, cond["drop"] equals running the model on that caption."""
  model = _tiny_pixart(False)
  model.save_pretrained(tmp_path / "transformer", safe_serialization=True)  # A pipeline root.
  null = np.random.default_rng(3).standard_normal((6, 24)).astype(np.float32)
  params, kwargs = convert.convert_pixart(str(tmp_path), null_caption=null)
  assert kwargs["null_caption"] == "learned" and kwargs["caption_length"] == 6
  x, t, _, text, mask = _inputs(4)
  with torch.no_grad():
    ref = model(
      _nchw(x),
      encoder_hidden_states=torch.from_numpy(np.broadcast_to(null, text.shape).copy()),
      timestep=torch.from_numpy(t),
      encoder_attention_mask=torch.from_numpy(mask),
      added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample.numpy()
  cond = {"text": jnp.asarray(text), "text_mask": jnp.asarray(mask), "drop": jnp.ones(B, bool)}
  np.testing.assert_allclose(_run(kwargs, params, x, t, cond), ref, atol=TOL, rtol=0)
  with pytest.raises(ValueError, match=r"null_caption must be \(L, 24\)"):
    convert.convert_pixart(str(tmp_path), null_caption=null[:, :5])


@needs_torch
def test_pixart_bad_checkpoint(tmp_path):
  model = _tiny_pixart(False)
  sd = _state(model)
  sd["transformer_blocks.1.scale_shift_table"] = np.zeros((5, 48), np.float32)
  del sd["caption_projection.linear_2.bias"]
  with pytest.raises(ValueError) as e:
    convert.pixart_params(sd, dict(model.config), "tiny")
  msg = str(e.value)
  assert "caption_projection.linear_2.bias" in msg
  assert "transformer_blocks.1.scale_shift_table: expected (6, 48), got (5, 48)" in msg
  with pytest.raises(FileNotFoundError):
    convert.convert_pixart(str(tmp_path / "missing"))


@pytest.mark.slow  # Over 20 s on 2 cores; the fast tests cover the parts.
@needs_torch
def test_sit_checkpoint_converts_to_a_flow_model_that_samples_as_sit(tmp_path, monkeypatch, capsys):
  # SiT's release is DiT's layout (learn_sigma=True, variance half unused); its time runs
  # from noise (0) to data (1), unscaled, and its velocity points that way.
  sd = _official_state_dict(_tiny_diffusers_dit())
  path = str(tmp_path / "SiT-tiny.pt")
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
  workdir = str(tmp_path / "sit")
  r = _command("dit.models.convert", "--kind=sit", f"--source={path}", f"--workdir={workdir}",
               "--num_heads=2")  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  from dit import checkpoint, generate
  from dit.diffusion import flow as flow_lib

  config = checkpoint.read_config(workdir)
  assert config.flow.reverse_time and config.flow.time_scale == 1.0 and config.model.learn_sigma
  flow = flow_lib.from_config(config)
  config.model.dtype = "float32"  # SiT's config computes in bfloat16.
  model, params = generate.load_params(config, workdir)
  # SiT's Euler ODE, written as SiT writes it: t from 0 to 1, x += dt * v(x, t).
  n, labels = 4, jnp.asarray([1, 7])
  x_T = jax.random.normal(jax.random.key(0), (2, S, S, C))
  x = x_T
  for i in range(n):
    t = jnp.full((2,), i / n)
    x = x + model.apply({"params": params}, x, t, {"label": labels})[..., :C] / n
  settings = generate.sampler_settings(config, sampler="euler", steps=n)
  cond = {"label": labels}
  denoise = generate.make_denoise(model, params, cond, 1.0, 2)
  ours = flow_samplers.sample(lambda x, t: denoise(x, t)[..., :C], x_T, jax.random.key(1), flow,
                              settings)  # fmt: skip
  np.testing.assert_allclose(ours, x, atol=1e-5)
  # The sample command (in this process) samples it with a flow sampler; a discrete sampler
  # is refused naming both.
  from test_early_checks import run_command_here

  from dit import sample

  out = tmp_path / "grid.png"
  args = (f"--workdir={workdir}", f"--out={out}", "--num=2", "--steps=3", "--sampler=heun")
  code, _, err = run_command_here(sample, *args, monkeypatch=monkeypatch, capsys=capsys)
  assert code == 0 and out.exists(), err
  with pytest.raises(UserError, match="flow-matching model.*'ddim'.*flow samplers: euler"):
    generate.sampler_settings(config, sampler="ddim")


def _command(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
