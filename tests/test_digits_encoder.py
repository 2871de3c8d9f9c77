"""experiments/digits_encoder.py: the digits stand-in for DINOv2 (REPA's frozen encoder).

A few dozen steps: it saves and reloads as a Hugging Face DINOv2, its loss falls, seeds
reproduce, the split keeps the held-out digits out, and bad arguments are one-line errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))

from dit import cli, metrics  # noqa: E402
from dit.models import dinov2  # noqa: E402
from experiments import digits_encoder  # noqa: E402

STEPS, BATCH = 30, 64  # One compile (the trainer is cached on these), shared by every run.
# The encoder with one layer instead of four: the same tokens and width, less compile time
# (which dominates these runs).
CONFIG = dataclasses.replace(digits_encoder.encoder_config(), num_hidden_layers=1)


def train(seed=0):
  return digits_encoder.train_encoder(STEPS, seed, BATCH, config=CONFIG)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """run() with seed 0: the directory it wrote and its train.json."""
  out = str(tmp_path_factory.mktemp("enc") / "digits_encoder")
  record = digits_encoder.run(out, steps=STEPS, seed=0, batch_size=BATCH, config=CONFIG)
  return out, record


def test_encoder_config_is_a_tiny_dinov2_on_a_4x4_grid():
  config = digits_encoder.encoder_config()
  assert (config.image_size, config.patch_size, config.grid_size) == (8, 2, 4)
  assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 4, 4)
  assert config.num_channels == 3 and config.num_register_tokens == 0
  hf = json.loads(json.dumps(config.to_hf_dict()))
  assert hf["model_type"] == "dinov2" and dinov2.Dinov2Config.from_dict(hf) == config


def _leaves(params):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def test_saves_a_dinov2_that_loads_and_gives_4x4_patch_features(trained):
  out, record = trained
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "train.json"]
  config, params = dinov2.load_dinov2(out)
  assert config == CONFIG
  images, _ = digits_encoder.held_out_split()
  for resolution in (None, 8):  # REPA's call; shapes only (the scorer ran these features).
    features = dinov2.make_features(
      config, resolution=resolution, value_range=(-1, 1), antialias=False
    )
    shapes = jax.eval_shape(features, params, images[:5])
    assert shapes["patch"].shape == (5, 16, 64) and shapes["cls"].shape == (5, 64)
  with open(os.path.join(out, "train.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(record))
  assert saved["config"] == dataclasses.asdict(CONFIG)
  assert (saved["steps"], saved["seed"], saved["batch_size"]) == (STEPS, 0, BATCH)
  for key in ("final_train_loss", "cls_accuracy", "patch_accuracy", "wall_time_s"):
    assert np.isfinite(saved[key]), key
  assert saved["held_out_size"] == 360 and saved["train_size"] == 1437


def test_loss_decreases():
  _, _, m = train()
  losses = m["losses"]
  assert losses.shape == (STEPS,) and np.isfinite(losses).all()
  # Two CE terms over 10 classes start near 2 ln 10 = 4.6 (a bit above with random heads).
  # Over seeds 0-5 the mean of the last five steps is 0.4-0.65 below that of the first five,
  # while the step-to-step noise is about 0.1 (so about 0.05 on a mean of five).
  assert losses[-5:].mean() < losses[:5].mean() - 0.2, losses


def test_objective_is_ce_of_the_cls_head_plus_ce_of_the_patch_mean_head():
  params = digits_encoder._initializer(CONFIG)(0)
  images, labels = (a[:6] for a in digits_encoder.training_split())
  # One jit: op by op, the forward passes take longer than their compile.
  feats, logits, loss = jax.jit(
    lambda p: (
      digits_encoder.feature_fn(CONFIG)(p["encoder"], images),
      digits_encoder._logits(CONFIG, p, images),
      digits_encoder._loss(CONFIG, p, images, labels),
    )
  )(params)
  heads = jax.tree_util.tree_map(np.asarray, params["heads"])
  cls = np.asarray(feats["cls"]) @ heads["cls"]["w"] + heads["cls"]["b"]
  patch = np.asarray(feats["patch"]).mean(1) @ heads["patch"]["w"] + heads["patch"]["b"]
  np.testing.assert_allclose(logits["cls"], cls, atol=1e-5)
  np.testing.assert_allclose(logits["patch"], patch, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits["tokens"]).mean(1), patch, atol=1e-5)

  def ce(z):
    z = z - z.max(-1, keepdims=True)
    return np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels])

  np.testing.assert_allclose(loss, ce(cls) + ce(patch), rtol=1e-5)


def test_same_seed_same_params_other_seed_other_params(trained):
  _, a, _ = train(0)
  _, b, _ = train(1)
  saved = dinov2.load_dinov2(trained[0])[1]  # The fixture's run, seed 0, through the files.
  assert jax.tree_util.tree_structure(saved) == jax.tree_util.tree_structure(a)
  assert all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(saved), strict=True))
  assert not any(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def test_trains_on_the_training_split_only():
  x_train, y_train = digits_encoder.training_split()
  x_test, y_test = digits_encoder.held_out_split()
  assert x_train.shape == (1437, 8, 8, 1) and x_train.dtype == np.float32
  assert x_train.min() == -1.0 and x_train.max() == 1.0
  assert len(y_train) + len(y_test) == 1797
  # The held-out images are dit.metrics' own, and the training images are the other
  # indices of the same permutation (indices, not pixels: two digits may look the same).
  np.testing.assert_array_equal(x_test, metrics.digits_held_out(0)[0])
  from sklearn.datasets import load_digits

  data = load_digits().data
  order = np.random.RandomState(digits_encoder.SPLIT_SEED).permutation(len(data))
  train_idx = order[: len(y_train)]
  np.testing.assert_array_equal(x_train.reshape(-1, 64), data[train_idx] / 8.0 - 1.0)
  assert not set(train_idx) & set(order[len(y_train) :])


def test_augment_shifts_by_at_most_one_pixel():
  images = np.full((64, 8, 8, 1), -1.0, np.float32)
  images[:, 3, 4] = 1.0
  x = np.asarray(jax.jit(digits_encoder.augment)(jax.random.key(0), images))
  assert x.shape == images.shape and x.min() >= -1.0 and x.max() <= 1.0
  rows, cols = np.unravel_index(x[..., 0].reshape(64, -1).argmax(-1), (8, 8))
  assert set(rows) <= {2, 3, 4} and set(cols) <= {3, 4, 5}
  assert len(set(zip(rows, cols, strict=True))) > 1  # Not all the same shift.


def test_bad_arguments_are_one_line_errors(tmp_path):
  with pytest.raises(cli.UserError, match="--out is required"):
    digits_encoder.run(None)
  with pytest.raises(cli.UserError, match="--out is required"):
    digits_encoder.run("")
  for steps in (0, -3):
    with pytest.raises(cli.UserError, match=f"--steps must be a positive integer, got {steps}"):
      digits_encoder.run(str(tmp_path / "x"), steps=steps)
  with pytest.raises(cli.UserError, match="batch_size must be in \\[1, 1437\\]"):
    digits_encoder.run(str(tmp_path / "x"), steps=1, batch_size=5000)
  assert not (tmp_path / "x").exists()


def test_command_rejects_missing_out_in_one_line():
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.digits_encoder", "--steps=0"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines == ["error: --out is required: the directory to write the encoder to "
                   "(e.g. --out=runs/digits_encoder)."], proc.stderr  # fmt: skip
