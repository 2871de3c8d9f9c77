"""Parity of dit.models.dit.DiT with diffusers' DiT and PixArt (float32, CPU), via convert.py.

Tiny random PyTorch models are built here, their weights converted with dit.models.convert,
and both models are run on the same inputs. Skips cleanly without the torch extra.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dit.models import convert  # noqa: E402
from dit.models.dit import DiT, sincos_pos_embed_2d  # noqa: E402

TOL = 1e-5
B, S, C = 3, 8, 4


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


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_official_dit_checkpoint(tmp_path, fmt):
  model = _tiny_diffusers_dit()
  sd = _official_state_dict(model)
  path = str(tmp_path / f"DiT-tiny.{fmt}")
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
