"""REPA (dit/objectives/repa.py): the captured hidden state, the projector, the alignment term
on the eps and flow objectives, one device against two (pmap and mesh), and bad settings."""

import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, tiny_config

from dit import train
from dit.cli import UserError
from dit.models import dinov2, dit, repeat
from dit.objectives import repa

ENCODER = dinov2.Dinov2Config(
  hidden_size=16,
  num_hidden_layers=1,
  num_attention_heads=2,
  image_size=8,
  patch_size=2,
  num_channels=1,
)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("repa") / "encoder")
  dinov2.save_hf(path, ENCODER, dinov2.init_params(ENCODER, 0))
  return path


def repa_config(encoder_dir, config_file="configs/digits_repa.py", **overrides):
  defaults = dict(
    repa__encoder_path=encoder_dir, model__repa_dim=16, model__repa_hidden=32, model__depth=3
  )
  return tiny_config(config_file, **{**defaults, **overrides})


def small_dit(**fields):
  kwargs = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2)
  kwargs.update(num_classes=10, learn_sigma=False, repa_hidden=24, repa_dim=8)
  return dit.DiT(**{**kwargs, **fields})


def test_alignment_loss_is_minus_mean_cosine():
  z, y = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
  expected = [
    -np.mean(
      [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(zr, yr, strict=True)]
    )
    for zr, yr in zip(np.asarray(z), np.asarray(y), strict=True)
  ]
  np.testing.assert_allclose(repa.alignment_loss(z, y), expected, rtol=1e-5)
  np.testing.assert_allclose(repa.alignment_loss(z, 3.0 * z), -1.0, rtol=1e-6)
  np.testing.assert_allclose(repa.alignment_loss(z, -z), 1.0, rtol=1e-6)


def test_match_grid_resizes_the_token_grid():
  f = jax.random.normal(jax.random.key(1), (2, 16, 3))
  assert repa.match_grid(f, (4, 4)) is f
  out = repa.match_grid(f, (2, 2))
  expected = jax.image.resize(f.reshape(2, 4, 4, 3), (2, 2, 2, 3), "linear", antialias=True)
  np.testing.assert_allclose(out, expected.reshape(2, 4, 3), rtol=1e-6)
  const = repa.match_grid(jnp.ones((1, 4, 3)), (4, 4))  # 2 x 2 -> 4 x 4.
  np.testing.assert_allclose(const, 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="12 tokens, not a square grid"):
    repa.match_grid(jnp.ones((1, 12, 3)), (4, 4))


@pytest.mark.parametrize("block, k", [("adaln_zero", 2), ("adaln_zero", 3), ("in_context", 1)])
def test_projection_is_of_the_tokens_after_block_k(block, k):
  model = small_dit(repa_block=k, block=block)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
  t, cond = jnp.array([3, 700]), {"label": jnp.array([1, 4])}
  params = model.init(jax.random.key(0), x, t, cond)["params"]
  # adaLN-Zero blocks start as the identity: move every param so that each block counts.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  noise = [0.1 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
  params = jax.tree.unflatten(tree, [p + n for p, n in zip(leaves, noise, strict=True)])
  out, state = model.apply({"params": params}, x, t, cond, mutable=["intermediates"])
  z = state["intermediates"]["repa"][0]
  assert z.shape == (2, 16, 8) and z.dtype == jnp.float32
  # Flax's own record of block k's output, through the projector by hand.
  _, seen = model.apply(
    {"params": params}, x, t, cond, capture_intermediates=lambda m, _: m.name == f"blocks_{k - 1}"
  )
  h = seen["intermediates"][f"blocks_{k - 1}"]["__call__"][0][:, :16]
  for i in range(3):
    h = jax.nn.silu(h) if i else h
    layer = params[f"repa_projector_{i}"]
    h = h @ layer["kernel"] + layer["bias"]
  np.testing.assert_allclose(z, h, rtol=1e-5, atol=1e-6)
  # Sampling skips the projector: the output is that of the model without REPA.
  plain = {k: v for k, v in params.items() if not k.startswith("repa_projector")}
  np.testing.assert_allclose(
    out, small_dit(block=block).apply({"params": plain}, x, t, cond), rtol=1e-6
  )
  # Scanned (per-block or stacked params) and rematerialised stacks capture the same tokens.
  stacked = repeat.stack_blocks(params, depth=3)
  for fields, p in [({"scan": True}, params), ({"scan": True}, stacked), ({"remat": True}, params)]:
    _, s = small_dit(repa_block=k, block=block, **fields).apply(
      {"params": p}, x, t, cond, mutable=["intermediates"]
    )
    np.testing.assert_allclose(s["intermediates"]["repa"][0], z, rtol=1e-5, atol=1e-6)


def _objective_losses(config):
  """(objective, params, batch, loss, metrics, base loss of the same params without REPA,
  the projections z the model sowed) on one batch."""
  from dit.diffusion import flow, schedules
  from dit.objectives import make_objective

  model = dit.build_model(config.model)
  schedule = None if flow.is_flow(config) else schedules.from_config(config.diffusion)
  x = jax.random.uniform(jax.random.key(3), (4, 8, 8, 1), minval=-1, maxval=1)
  batch = {"x0": x, "label": jnp.arange(4), "keys": jax.random.split(jax.random.key(4), 4)}
  params = model.init(jax.random.key(0), *dit.example_inputs(model, 4))["params"]
  sown = []
  apply_features = train.make_apply(model, intermediates=True)

  def apply(*args):
    out, intermediates = apply_features(*args)
    sown.append(intermediates["repa"][0])
    return out, intermediates

  objective = make_objective(config, apply, schedule)
  value, metrics = objective.loss(params, batch, objective.frozen)
  plain_config = config.copy_and_resolve_references()
  plain_config.model.repa_block = 0
  plain = make_objective(
    plain_config, train.make_apply(dit.build_model(plain_config.model)), schedule
  )
  plain_params = {k: v for k, v in params.items() if not k.startswith("repa_projector")}
  base, _ = plain.loss(plain_params, batch, {})
  return objective, params, batch, value, metrics, base, sown


@pytest.mark.parametrize("config_file", ["configs/digits_repa.py", "configs/digits_repa.py:flow"])
def test_loss_is_base_plus_weighted_alignment(encoder_dir, config_file):
  config = repa_config(encoder_dir, config_file, repa__weight=0.7)
  objective, params, batch, value, metrics, base, sown = _objective_losses(config)
  # The term is minus the cosine of the projection to the frozen encoder's features of the
  # clean images (not of x_t, not of another layout).
  (z,) = sown
  y = repa.encoder_features(ENCODER, 0)(objective.frozen["repa_encoder"], batch["x0"])
  assert y.shape == (4, 16, 16)
  np.testing.assert_allclose(metrics["repa_align"], repa.alignment_loss(z, y).mean(), rtol=1e-5)
  np.testing.assert_allclose(value, base + 0.7 * metrics["repa_align"], rtol=1e-5)
  # Gradients reach the projector; the encoder is a frozen input, not a param.
  grads = jax.grad(lambda p: objective.loss(p, batch, objective.frozen)[0])(params)
  assert float(jnp.abs(grads["repa_projector_0"]["kernel"]).max()) > 0
  assert "repa_encoder" in objective.frozen and "repa_encoder" not in params


DRIVER = r"""
import json, sys
sys.path.insert(0, "tests")
import numpy as np
from conftest import tiny_config
from dit import train
spec = json.loads(sys.argv[1])
for workdir, overrides in spec:
  state = train.train_and_evaluate(tiny_config("configs/digits_repa.py", **overrides), workdir)
  flat = {"/".join(map(str, k)): np.asarray(v) for k, v in
          __import__("flax").traverse_util.flatten_dict(state["params"]).items()}
  np.savez(workdir + "/params.npz", **flat)
"""


def _run_devices(runs, devices):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_DEFAULT_MATMUL_PRECISION="highest",
  )
  result = subprocess.run(
    [sys.executable, "-c", DRIVER, json.dumps(runs)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow  # Two subprocesses on 2 simulated devices (about 55 s).
def test_two_devices_match_one_on_pmap_and_mesh(encoder_dir, tmp_path):
  base = dict(
    repa__encoder_path=encoder_dir, model__repa_dim=16, model__repa_hidden=32, model__depth=2
  )
  one, pmap2, mesh2 = (str(tmp_path / n) for n in ("one", "pmap2", "mesh2"))
  state = train.train_and_evaluate(tiny_config("configs/digits_repa.py", **base), one)
  flat = flax.traverse_util.flatten_dict(state["params"])
  ref = {"/".join(k): np.asarray(v) for k, v in flat.items()}
  assert any("repa_projector" in k for k in ref)
  _run_devices([[pmap2, base], [mesh2, {**base, "parallelism": "mesh"}]], 2)
  ref_rows = [json.loads(line) for line in open(os.path.join(one, "metrics.jsonl"))]
  for other in (pmap2, mesh2):
    got = dict(np.load(other + "/params.npz"))
    assert got.keys() == ref.keys()
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
    rows = [json.loads(line) for line in open(os.path.join(other, "metrics.jsonl"))]
    np.testing.assert_allclose(
      [r["repa_align"] for r in rows], [r["repa_align"] for r in ref_rows], rtol=1e-5
    )


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      {"repa__encoder_path": "/nonexistent/enc"},
      r"encoder_path: .*'/nonexistent/enc' does not exist",
    ),
    ({"repa__resolution": 7}, r"repa.resolution=7: .*not a positive multiple of its patch size 2"),
    ({"model__repa_block": 4}, r"repa_block=4 is not a block of this model: expected 1..3"),
    ({"model__repa_dim": 32}, r"repa_dim=32, but the encoder .* features of width 16"),
    ({"repa__source": "precomputed"}, r"source='precomputed' reads batch\['repa'\]"),
    ({"repa__source": "disk"}, r"repa.source must be one of \('encoder', 'precomputed'\)"),
    ({"repa__weight": -1.0}, r"repa.weight must be >= 0, got -1.0"),
  ],
)
def test_bad_settings_fail_before_the_first_step(encoder_dir, tmp_path, overrides, message):
  config = repa_config(encoder_dir, **overrides)
  with pytest.raises((UserError, ValueError), match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_imagenet_config_is_the_papers_setup():
  from dit.cli import load_config

  config = load_config(str(ROOT / "configs/imagenet256_repa.py:XL/2"))
  params = dit.abstract_params(dit.build_model(config.model))
  proj = sum(x.size for k, v in params.items() if k.startswith("repa") for x in jax.tree.leaves(v))
  # REPA's build_mlp(1152, 2048, 768): 1152 * 2048 + 2048 * 2048 + 2048 * 768 + biases.
  assert proj == 8_131_328
  total = sum(x.size for x in jax.tree.leaves(params))
  assert total - proj == 674_834_720  # SiT-XL/2 (DiT-XL/2's model) itself.
  assert (config.model.repa_block, config.repa.weight, config.repa.resolution) == (8, 0.5, 224)


def test_not_a_dinov2_checkpoint_is_an_error(encoder_dir, tmp_path):
  bad = tmp_path / "vit"
  bad.mkdir()
  hf = json.load(open(os.path.join(encoder_dir, "config.json")))
  (bad / "config.json").write_text(json.dumps({**hf, "model_type": "vit"}))
  (bad / "model.safetensors").write_bytes(
    open(os.path.join(encoder_dir, "model.safetensors"), "rb").read()
  )
  config = repa_config(encoder_dir, repa__encoder_path=str(bad))
  with pytest.raises(UserError, match=r"encoder_path: .*model_type"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_repa_run_saves_the_projector_but_not_the_encoder(encoder_dir, tmp_path):
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(repa_config(encoder_dir), workdir)
  flat = flax.traverse_util.flatten_dict(state["params"])
  assert any(k[0].startswith("repa_projector") for k in flat)
  assert not any("cls_token" in k for k in flat)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all(-1 <= r["repa_align"] <= 1 for r in rows)
  # The run samples like any other (the projector is not run).
  from dit import generate

  config = repa_config(encoder_dir)
  model, params = generate.load_params(config, workdir)
  images = generate.generate(config, model, params, {"label": jnp.arange(2)}, jax.random.key(0), 2)
  assert np.shape(images)[:1] == (2,) and np.isfinite(np.asarray(images)).all()


def test_precomputed_features_give_the_encoders_loss(encoder_dir, tmp_path):
  """dit.data.precompute --repa_encoder stores what the online encoder computes: on the same
  batch the two sources give the same loss and metrics."""
  from dit.data import pipeline
  from dit.data.digits import DigitsSource
  from dit.data.precompute import load_encoders, load_repa_encoder, precompute
  from dit.diffusion import schedules
  from dit.objectives import make_objective

  data = str(tmp_path / "data")
  identity, _ = load_encoders("identity")  # Pixel-space: the "latents" are the images.
  precompute(
    DigitsSource(8),
    data,
    encode_images=identity,
    encode_repa=load_repa_encoder(encoder_dir),
    resolution=8,
    channels=1,
    batch_size=256,
    shard_size=2048,
  )
  config = repa_config(encoder_dir, data__name="precomputed", data__path=data)
  batch = next(pipeline.make_train_iterator(config.data, global_batch_size=8, seed=0))
  assert batch["repa"].shape == (8, 16, 16)
  model = dit.build_model(config.model)
  params = model.init(jax.random.key(0), *dit.example_inputs(model, 8))["params"]
  inputs = {
    "x0": jnp.asarray(batch["latent"]),
    "label": jnp.asarray(batch["label"]),
    "keys": jax.random.split(jax.random.key(1), 8),
  }
  apply = train.make_apply(model, intermediates=True)
  schedule = schedules.from_config(config.diffusion)
  losses = {}
  for source in repa.SOURCES:
    config.repa.source = source
    objective = make_objective(config, apply, schedule)
    extra = {"repa": jnp.asarray(batch["repa"])} if source == "precomputed" else {}
    losses[source] = objective.loss(params, {**inputs, **extra}, objective.frozen)
  (online, m_online), (stored, m_stored) = losses["encoder"], losses["precomputed"]
  np.testing.assert_allclose(stored, online, rtol=1e-6)
  np.testing.assert_allclose(m_stored["repa_align"], m_online["repa_align"], rtol=1e-6)
