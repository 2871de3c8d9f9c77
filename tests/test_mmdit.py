"""Stable Diffusion 3's MMDiT (dit/models/mmdit.py), its SD3 converter and configs/t2i_mmdit.py.

Parity: a tiny random diffusers SD3Transformer2DModel (float32, CPU), saved with
save_pretrained, converted by dit.models.convert and run on the same inputs. Without torch the
model's own rules still run: bad fields and inputs, the pooled mean and null caption, scan and
remat. The prompt-accuracy bar (>= 80% of prompted samples classified as their digit) is the
slow test.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES

from dit import checkpoint, generate
from dit.cli import load_config
from dit.models import convert, mmdit
from dit.models import dit as dit_model

try:
  import diffusers
  import torch
except ImportError:  # The core install: the torch-free tests still run.
  torch = diffusers = None

needs_torch = pytest.mark.skipif(
  torch is None, reason="parity with diffusers needs the torch extra (pip install 'dit[torch]')"
)

CONFIG = str(ROOT / "configs/t2i_mmdit.py")
B, S, C, L = 3, 8, 4, 7  # Batch, image side, channels, text tokens.
TEXT, POOLED = 16, 12  # joint_attention_dim, pooled_projection_dim.
TINY = dict(
  input_size=S, patch_size=2, in_channels=C, hidden_size=16, depth=3, num_heads=2,
  caption_channels=TEXT, caption_length=L,
)  # fmt: skip


def _inputs(seed=0, h=S, w=S):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, h, w, C)).astype(np.float32)
  t = np.array([0.0, 371.0, 999.0], np.float32)  # SD3's timestep: 1000 sigma.
  text = rng.standard_normal((B, L, TEXT)).astype(np.float32)
  pooled = rng.standard_normal((B, POOLED)).astype(np.float32)
  mask = np.ones((B, L), np.int32)
  mask[0, 3:] = 0
  mask[2, 1:] = 0
  return x, t, text, pooled, mask


def _random_params(model, seed=0, std=0.1):
  """Every param random (the adaLN and final layers start at zero)."""
  x, t, cond = model.example_inputs(1)
  params = model.init(jax.random.key(0), x, t, cond)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [std * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
  )


_JITTED = {}


def _apply(model, params, x, t, cond):
  """model.apply, jitted once per model (its fields are its repr)."""
  apply = _JITTED.setdefault(repr(model), jax.jit(model.apply))
  return np.asarray(apply({"params": params}, jnp.asarray(x), jnp.asarray(t), cond))


# ---- Parity with diffusers -----------------------------------------------------------------


def _tiny_sd3(qk_norm, seed=0, **overrides):
  config = dict(
    sample_size=S, patch_size=2, in_channels=C, out_channels=C, num_layers=3,
    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT,
    caption_projection_dim=16, pooled_projection_dim=POOLED, pos_embed_max_size=16,
    qk_norm=qk_norm,
  )  # fmt: skip
  model = diffusers.SD3Transformer2DModel(**{**config, **overrides})
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # Every weight random; the QK-norm scales around one.
    for name, p in model.named_parameters():
      one = 1.0 if ".norm_" in name and name.endswith(".weight") else 0.0
      p.copy_(one + 0.2 * torch.randn(p.shape, generator=g))
  return model.eval()


def _sd3_forward(model, x, t, text, pooled):
  with torch.no_grad():
    out = model(
      torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
      encoder_hidden_states=torch.from_numpy(text),
      pooled_projections=torch.from_numpy(pooled),
      timestep=torch.from_numpy(t),
    ).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _converted(tmp_path, sd3):
  sd3.save_pretrained(tmp_path, safe_serialization=True)
  params, kwargs = convert.convert_sd3(str(tmp_path))
  assert kwargs.pop("arch") == "mmdit"
  return mmdit.build_model(kwargs), params


@needs_torch
@pytest.mark.parametrize("qk_norm", [None, "rms_norm", "layer_norm"])
def test_sd3_parity(tmp_path, qk_norm):
  sd3 = _tiny_sd3(qk_norm)
  model, params = _converted(tmp_path, sd3)
  assert model.null_caption == "zeros" and model.attend_padding and model.pooled_channels == POOLED
  x, t, text, pooled, mask = _inputs()
  # SD3 attends to the padding: text_mask changes nothing with attend_padding.
  cond = {"text": text, "pooled": pooled, "text_mask": mask}
  np.testing.assert_allclose(
    _apply(model, params, x, t, cond), _sd3_forward(sd3, x, t, text, pooled), atol=1e-4, rtol=0
  )
  if qk_norm != "rms_norm":
    return
  # A non-square grid: another crop of the 16 x 16 position table.
  x2 = np.random.default_rng(1).standard_normal((B, 12, 6, C)).astype(np.float32)
  np.testing.assert_allclose(
    _apply(model, params, x2, t, cond), _sd3_forward(sd3, x2, t, text, pooled), atol=1e-4, rtol=0
  )
  # Dropped rows: SD3's zeroed text and pooled vector.
  drop = {**cond, "drop": jnp.asarray([True, False, True])}
  keep = np.array([0.0, 1.0, 0.0], np.float32)
  want = _sd3_forward(sd3, x, t, text * keep[:, None, None], pooled * keep[:, None])
  np.testing.assert_allclose(_apply(model, params, x, t, drop), want, atol=1e-4, rtol=0)


@needs_torch
def test_sd3_without_cropping_and_with_learned_sigma(tmp_path):
  sd3 = _tiny_sd3("rms_norm", seed=2, pos_embed_max_size=None, out_channels=2 * C, num_layers=1)
  model, params = _converted(tmp_path, sd3)
  assert model.pos_embed_max_size == 0 and model.learn_sigma and model.depth == 1
  x, t, text, pooled, _ = _inputs(3)
  got = _apply(model, params, x, t, {"text": text, "pooled": pooled})
  np.testing.assert_allclose(got, _sd3_forward(sd3, x, t, text, pooled), atol=1e-4, rtol=0)


@needs_torch
def test_sd3_checkpoint_errors(tmp_path):
  sd3 = _tiny_sd3("rms_norm")
  cfg = dict(sd3.config)
  sd = {k: v.detach().numpy() for k, v in sd3.state_dict().items()}
  bad = dict(sd)
  del bad["transformer_blocks.1.attn.to_add_out.bias"]
  bad["transformer_blocks.0.norm1.linear.weight"] = np.zeros((95, 16), np.float32)
  bad["transformer_blocks.2.attn.to_add_out.weight"] = np.zeros((16, 16), np.float32)
  with pytest.raises(ValueError) as e:
    convert.sd3_params(bad, cfg, "tiny")
  msg = str(e.value)
  assert "missing keys (1): ['transformer_blocks.1.attn.to_add_out.bias']" in msg
  assert "unexpected keys (1): ['transformer_blocks.2.attn.to_add_out.weight']" in msg
  assert "transformer_blocks.0.norm1.linear.weight: expected (96, 16), got (95, 16)" in msg
  with pytest.raises(ValueError, match=r"dual_attention_layers=\[0, 1\]: SD3.5's dual attention"):
    convert.sd3_params(sd, {**cfg, "dual_attention_layers": (0, 1)}, "tiny")
  with pytest.raises(ValueError, match="caption_projection_dim=24; expected 16"):
    convert.sd3_params(sd, {**cfg, "caption_projection_dim": 24}, "tiny")
  moved = {**sd, "pos_embed.pos_embed": sd["pos_embed.pos_embed"] + 0.01}
  with pytest.raises(ValueError, match="pos_embed.pos_embed differs from SD3's sin-cos table"):
    convert.sd3_params(moved, cfg, "tiny")
  # The last block's text queries compute nothing: any values convert to the same params.
  dead = {**sd, "transformer_blocks.2.attn.add_q_proj.weight": np.zeros((16, 16), np.float32)}
  a, _ = convert.sd3_params(sd, cfg)
  b, _ = convert.sd3_params(dead, cfg)
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.mark.slow  # Over 20 s on 2 cores; the fast tests cover the parts.
@needs_torch
def test_convert_command_then_sample(tmp_path):
  """dit.models.convert --kind=sd3 writes a workdir that dit.generate loads and samples."""
  from test_convert import _command

  sd3 = _tiny_sd3("rms_norm")
  sd3.save_pretrained(tmp_path / "sd3" / "transformer", safe_serialization=True)  # A pipeline.
  workdir = tmp_path / "run"
  r = _command("dit.models.convert", "--kind=sd3", f"--source={tmp_path / 'sd3'}",
               f"--workdir={workdir}", "--noprogress")  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  config, model, params = generate.load(str(workdir))
  assert config.model.arch == "mmdit" and config.flow.shift == 3.0
  assert config.sample.sampler == "euler" and config.data.max_text_length == 333
  x, t, text, pooled, _ = _inputs()
  want = _sd3_forward(sd3, x, t, text, pooled)
  got = _apply(model, params, x, t, {"text": text, "pooled": pooled})
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  cond = {"text": jnp.asarray(text), "pooled": jnp.asarray(pooled)}
  images = generate.generate(config, model, params, cond, jax.random.key(0), B, steps=2)
  assert images.shape == (B, S, S, C) and bool(jnp.isfinite(images).all())


# ---- The model's own rules -----------------------------------------------------------------


def test_bad_fields_fail_at_construction():
  with pytest.raises(ValueError, match="needs a text input: caption_channels must be > 0"):
    mmdit.MMDiT(**{**TINY, "caption_channels": 0})
  with pytest.raises(ValueError, match="num_classes must be 0, got 10"):
    mmdit.MMDiT(**TINY, num_classes=10)
  with pytest.raises(ValueError, match="qk_norm must be one of"):
    mmdit.MMDiT(**TINY, qk_norm="l2")
  with pytest.raises(ValueError, match="null_caption must be one of"):
    mmdit.MMDiT(**TINY, null_caption="frozen")
  with pytest.raises(ValueError, match="pos_embed_max_size=3 is smaller than the training grid"):
    mmdit.MMDiT(**TINY, pos_embed_max_size=3)
  with pytest.raises(ValueError, match=r"Unknown config.model fields \['block'\].*accepts"):
    dit_model.build_model({**TINY, "arch": "mmdit", "block": "adaln_zero"})
  model = dit_model.build_model({**TINY, "arch": "mmdit", "class_dropout_prob": 0.1})
  assert isinstance(model, mmdit.MMDiT) and model.out_channels == C and not model.learn_sigma


def test_bad_inputs_are_named():
  model = mmdit.MMDiT(**TINY, pooled_channels=POOLED)
  x, t, text, pooled, mask = _inputs()
  params = dit_model.abstract_params(model)  # The checks come before any param is read.
  run = lambda cond, x=x: model.apply({"params": params}, x, t, cond)
  with pytest.raises(ValueError, match=r"needs cond\['pooled'\] of shape \(3, 12\)"):
    run({"text": text})
  with pytest.raises(ValueError, match=r"cond\['text'\] must be \(B, L, caption_channels\)"):
    run({"text": text[..., :5], "pooled": pooled})
  with pytest.raises(ValueError, match=r"cond\['text_mask'\] must be \(B, L\)"):
    run({"text": text, "pooled": pooled, "text_mask": mask[:, :3]})
  with pytest.raises(ValueError, match="x has 3 channels"):
    run({"text": text, "pooled": pooled}, x[..., :3])
  no_pool = mmdit.MMDiT(**TINY)
  p0 = dit_model.abstract_params(no_pool)
  with pytest.raises(ValueError, match="with pooled_channels=0 the pooled vector is the text"):
    no_pool.apply({"params": p0}, x, t, {"text": text, "pooled": pooled})
  with pytest.raises(ValueError, match="more than caption_length=7"):
    no_pool.apply({"params": p0}, x, t, {"text": np.concatenate([text, text], 1)})


@pytest.mark.slow  # About 15 s; the parity tests cover dropped rows.
def test_padding_pooled_mean_and_null_caption():
  """pooled_channels=0: the pooled vector is the mean of the real tokens, and the attention
  skips the padding; dropped rows see the whole learned null caption."""
  model = mmdit.MMDiT(**TINY)
  params = _random_params(model)
  x, t, text, _, mask = _inputs()
  ones, keep = np.ones_like(mask), np.zeros(B, bool)
  run = lambda m, text, mask, drop=keep: _apply(
    m, params, x, t, {"text": text, "text_mask": mask, "drop": drop}
  )  # One structure of cond: one compilation per model.
  other = np.where(mask[..., None] > 0, text, 5.0).astype(np.float32)  # New padding values.
  base = run(model, text, mask)
  np.testing.assert_allclose(run(model, other, mask), base, atol=1e-5)
  assert np.abs(run(model, text, ones) - base).max() > 1e-3  # The mask matters.
  moved = run(mmdit.MMDiT(**TINY, attend_padding=True), other, mask)
  assert np.abs(moved - base)[[0, 2]].max() > 1e-3 and np.abs(moved - base)[1].max() < 1e-5
  # Text tokens have no positions: the joint attention and the mean are blind to their order.
  np.testing.assert_allclose(run(model, text[:, ::-1], mask[:, ::-1]), base, atol=1e-5)
  dropped = run(model, text, mask, np.ones(B, bool))
  null = np.broadcast_to(np.asarray(params["y_embedding"]), text.shape)
  np.testing.assert_allclose(run(model, null, ones), dropped, atol=1e-5)
  np.testing.assert_allclose(_apply(model, params, x, t, {}), dropped, atol=1e-5)  # No text.


@pytest.mark.slow  # About 28 s; tests/test_scan.py checks two-stream carries.
def test_scan_and_remat_compute_the_same():
  """Scanned, rematerialised (unrolled or scanned): the same outputs and gradients."""
  x, t, text, _, mask = _inputs()
  cond = {"text": text, "text_mask": mask}
  params = _random_params(mmdit.MMDiT(**TINY, qk_norm="rms_norm"))

  def outputs_and_grads(**opts):
    model = mmdit.MMDiT(**TINY, qk_norm="rms_norm", **opts)
    loss = lambda p: (lambda out: (jnp.sum(out**2), out))(model.apply({"params": p}, x, t, cond))
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  g0, out0 = outputs_and_grads()
  for opts in (dict(scan=True), dict(remat=True), dict(scan=True, remat=True)):
    g, out = outputs_and_grads(**opts)
    np.testing.assert_allclose(out, out0, atol=1e-5, err_msg=str(opts))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-4, err_msg=str(opts))


# ---- configs/t2i_mmdit.py ------------------------------------------------------------------


def test_config_variants():
  for arg in ("", ":flow", ":sd3"):
    config = load_config(CONFIG + arg)
    assert config.model.arch == "mmdit" and config.model.caption_channels == config.text.demo_dim
    assert config.model.caption_length == config.data.max_text_length == config.text.max_length
    assert ("flow" in config) == bool(arg) and ("diffusion" in config) == (not arg)
    model = dit_model.build_model(config.model)
    assert isinstance(model, mmdit.MMDiT)
  assert config.flow.shift == 3.0
  shapes = dit_model.abstract_params(model)
  assert shapes["blocks_3"]["attn"]["context_kv"]["kernel"].shape == (128, 256)
  with pytest.raises(Exception, match="takes one of"):
    load_config(CONFIG + ":sd35")


@pytest.mark.parametrize(
  "arg,scan",
  [
    pytest.param("", False, marks=pytest.mark.slow),
    pytest.param(":flow", True, marks=pytest.mark.slow),
  ],
)
def test_t2i_mmdit_trains_and_samples(tmp_path, monkeypatch, capsys, arg, scan):
  """configs/t2i_mmdit.py, tiny: two steps through dit.train (eps, or flow with the scanned
  blocks' stacked train state), two prompts through dit.sample."""
  from test_early_checks import run_command_here

  from dit import sample, train

  tiny = {
    **TINY_OVERRIDES, "total_steps": 2, "ckpt_every": 2, "text.demo_dim": 16,
    "text.demo_layers": 1, "text.demo_heads": 2, "model.depth": 3, "model.scan": scan,
  }  # fmt: skip
  args = [f"--config={CONFIG}{arg}", f"--workdir={tmp_path}"]
  args += [f"--config.{k}={v}" for k, v in tiny.items()]
  code, _, err = run_command_here(train, *args, monkeypatch=monkeypatch, capsys=capsys)
  assert code == 0, err[-2000:]
  config = checkpoint.read_config(str(tmp_path))
  assert config.model.arch == "mmdit" and ("flow" in config) == bool(arg)
  assert json.load(open(tmp_path / "config.json"))["model"]["pooled_channels"] == 0
  out = tmp_path / "seven.png"
  code, _, err = run_command_here(
    sample, f"--workdir={tmp_path}", f"--out={out}", "--num=2", "--steps=2",
    "--prompt=a handwritten digit seven", "--prompt=", monkeypatch=monkeypatch, capsys=capsys,
  )  # fmt: skip
  assert code == 0 and out.exists(), err[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["", ":flow"])
def test_prompted_digits_are_recognised(tmp_path, arg):
  """The full configs/t2i_mmdit.py run: >= 80% of 200 prompted samples show their digit."""
  from test_t2i import prompt_accuracy

  from dit import train

  config = load_config(CONFIG + arg)
  config.progress_bar = False
  config.sample.num = 0
  workdir = str(tmp_path / "t2i")
  train.train_and_evaluate(config, workdir)
  model, params = generate.load_params(config, workdir)
  accuracy = prompt_accuracy(config, model, params, num=200)
  assert accuracy >= 0.8, accuracy
