"""dit.evaluate: samples from a checkpoint, digits metrics, eval.json, bad input."""

import json

import jax
import numpy as np
import pytest
from conftest import ROOT, run_cli, tiny_config

from dit import evaluation, fid_stats, generate, metrics, train
from dit.cli import UserError
from dit.data import load_digits_arrays
from dit.models import dit as dit_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval") / "run")
  train.train_and_evaluate(tiny_config(), workdir)
  return workdir


@pytest.mark.slow  # About 10 s; the default run's budget.
def test_evaluate_command_writes_eval_json(trained):
  result = run_cli(
    "dit.evaluate",
    "--config=configs/digits.py",
    f"--workdir={trained}",
    **{"eval.num_samples": 100, "eval.batch_size": 50},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sampling: 100%" in result.stderr and "100/100" in result.stderr  # The tqdm bar.
  with open(f"{trained}/eval.json") as f:
    out = json.load(f)
  assert out["num_samples"] == 100
  assert out["sampler"] == "ddim" and out["steps"] == 5 and out["cfg_scale"] == 4.0
  # The numbers are those of the EMA params' samples (seed 0), recomputed here from the
  # classifier's predictions and features.
  config = tiny_config(**{"eval.num_samples": 100, "eval.batch_size": 50})
  model, params = generate.load_params(config, trained)
  images, labels = evaluation.generate_samples(
    config, model, params, jax.random.PRNGKey(0), 100, 50
  )
  np.testing.assert_array_equal(np.bincount(labels), [10] * 10)
  pred = metrics.digits_classifier().predict(metrics.digits_to_grey_levels(images) / 16.0)
  assert out["accuracy"] == pytest.approx(np.mean(pred == labels))
  for k in range(10):
    assert out[f"accuracy_class_{k}"] == pytest.approx(np.mean(pred[labels == k] == k)), k
  features = metrics.digits_feature_fn()
  real, _ = load_digits_arrays(config.data.resolution)
  fd = metrics.fid_from_features(features(real), features(images))
  assert out["digits_fd"] == pytest.approx(fd, rel=1e-4)


def test_generate_samples_is_class_balanced_and_deterministic():
  config = tiny_config()
  model = dit_model.build_model(config.model)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), *dit_model.example_inputs(model))["params"]
  a, labels = evaluation.generate_samples(config, model, params, jax.random.PRNGKey(1), 30, 20)
  b, _ = evaluation.generate_samples(
    config, model, params, jax.random.PRNGKey(1), 30, 20, progress=True
  )
  assert a.shape == (30, 8, 8, 1) and np.all(np.abs(a) <= 1.0)
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [3] * 10)
  np.testing.assert_array_equal(a, b)


def _fd_dinov2_config(tmp_path, num_real=0):
  """tiny_config evaluating "digits,fd_dinov2" with a tiny random DINOv2 (HF format) and
  reference statistics of num_real real digits written as `dit.fid_stats --feature=dinov2`
  does (num_real=0: placeholder statistics)."""
  import transformers

  dino = tmp_path / "dinov2"
  hf = transformers.Dinov2Config(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
  )
  transformers.Dinov2Model(hf).save_pretrained(dino)
  config = tiny_config(**{"eval.num_samples": 100, "eval.batch_size": 50})
  features = np.random.RandomState(0).randn(20, 16)
  if num_real:
    real = load_digits_arrays(config.data.resolution)[0][:num_real]
    features = fid_stats.features_of_images(
      np.repeat(generate.to_uint8(real), 3, -1), fid_stats.dinov2_cls_fn(str(dino))
    )
  fid_stats.save_stats(str(tmp_path / "dino_ref.npz"), *metrics.feature_statistics(features))
  with config.unlocked():  # Keys the shipped configs may not have yet.
    config.eval.metric = "digits,fd_dinov2"
    config.eval.dinov2_path = str(dino)
    config.eval.dinov2_ref_stats = str(tmp_path / "dino_ref.npz")
  return config, features


def test_fd_dinov2_end_to_end(trained, tmp_path):
  """eval.metric = "digits,fd_dinov2": both metrics on the same samples; FD-DINOv2 is the
  Frechet distance of the samples' CLS features to the real digits' statistics."""
  config, real_features = _fd_dinov2_config(tmp_path, num_real=200)
  model, params = generate.load_params(config, trained)
  out = evaluation.evaluate(config, model, params, jax.random.PRNGKey(0))
  assert {"accuracy", "digits_fd", "fd_dinov2"} <= set(out) and out["num_samples"] == 100
  images, _ = evaluation.generate_samples(config, model, params, jax.random.PRNGKey(0), 100, 50)
  fn = fid_stats.dinov2_cls_fn(config.eval.dinov2_path)
  fake = fid_stats.features_of_images(np.repeat(generate.to_uint8(images), 3, -1), fn)
  want = metrics.fid_from_features(real_features, fake)
  assert out["fd_dinov2"] == pytest.approx(want, rel=1e-6) and want > 0
  assert metrics.fid_from_features(real_features, real_features) < 1e-6 * want


def test_fd_dinov2_config_is_checked_before_sampling(tmp_path):
  config, _ = _fd_dinov2_config(tmp_path)
  evaluation.check_eval_config(config)
  for key, value, message in [
    ("metric", "fid,fd_dino", "config.eval.metric must be one of"),
    ("metric", "fd_dinov2,fd_dinov2", "comma-separated list of distinct ones"),
    ("dinov2_ref_stats", str(tmp_path / "no.npz"), "dinov2_ref_stats must name an existing"),
    ("dinov2_path", str(tmp_path / "no"), "dinov2_path: DINOv2 model directory .* not exist"),
    ("dinov2_path", str(tmp_path), r"dinov2_path: .* is missing \['config.json'"),
  ]:
    bad = config.copy_and_resolve_references()
    bad.eval[key] = value
    with pytest.raises(UserError, match=message):
      evaluation.check_eval_config(bad)
  vit = tmp_path / "vit"
  vit.mkdir()
  (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
  (vit / "model.safetensors").write_bytes(b"")
  config.eval.dinov2_path = str(vit)
  with pytest.raises(UserError, match="describes a 'vit' model; expected a DINOv2 config"):
    evaluation.check_eval_config(config)


@pytest.mark.parametrize(
  "override, message",
  [
    ({"metric": "bogus"}, "config.eval.metric must be one of"),
    ({"num_samples": 0}, "must be positive"),
    ({"metric": "fid"}, "config.eval.inception_path must name an existing file"),
  ],
)
def test_bad_eval_config(override, message):
  config = tiny_config(**{"eval.num_samples": 4, **{f"eval.{k}": v for k, v in override.items()}})
  model = dit_model.build_model(config.model)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), *dit_model.example_inputs(model))["params"]
  with pytest.raises(UserError, match=message):
    evaluation.evaluate(config, model, params, jax.random.PRNGKey(0))


def test_fid_config_is_checked_before_sampling_or_training(tmp_path):
  """FID needs its two files and RGB images; a latent model needs config.vae.path. All of it
  is checked up front: by dit.evaluate before sampling, by dit.train before step 1."""
  from dit.cli import load_config

  config = load_config(str(ROOT / "configs/imagenet256_dit.py:S/2"))
  assert config.eval.metric == "fid" and config.eval.every == 0 and config.vae.path == ""
  weights, stats = tmp_path / "inception.pth", tmp_path / "ref.npz"
  weights.write_bytes(b"x")
  stats.write_bytes(b"x")
  config.eval.inception_path = str(weights)
  with pytest.raises(UserError, match="config.eval.ref_stats must name an existing file"):
    evaluation.check_eval_config(config)
  config.eval.ref_stats = str(stats)
  with pytest.raises(UserError, match="4-channel latents and config.vae.path is empty"):
    evaluation.check_eval_config(config)
  config.vae.path = str(tmp_path)
  evaluation.check_eval_config(config)
  config.eval.every = 1000
  config.eval.ref_stats = str(tmp_path / "missing.npz")
  with pytest.raises(UserError, match="config.eval.ref_stats must name an existing file"):
    train.check_config(config, 1)
