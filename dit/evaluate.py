"""Evaluation: sample from a checkpoint, compute metrics, write `eval.json`.

  python -m dit.evaluate --config=configs/digits.py --workdir=runs/digits

config.eval.metric picks the metrics:
- "digits": conditional accuracy of a classifier fitted on the real digits (is a sample of
  class k recognised as k?) and a Frechet distance in that classifier's feature space
  against the real digits (an FID-like number that runs in seconds).
- "fid": FID (and Inception Score) with the FID InceptionV3 (config.eval.inception_path,
  pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`) against reference statistics
  (config.eval.ref_stats: an ADM/pytorch-fid `.npz`). Latent models are decoded with the
  VAE in config.vae.path.

Samples are drawn in batches of config.eval.batch_size with the jitted scan sampler,
classes spread evenly over the samples.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from dit import metrics
from dit import sample as sample_lib
from dit.cli import UserError, run_command

METRICS = ("digits", "fid")


def generate_samples(config, model, params, key, num: int, batch_size: int):
  """(num, H, W, C) images in [-1, 1] and their labels (num,), class-balanced.

  Class models are conditioned on the labels, text models on the digit prompts of
  config.sample.prompt_template; latents are decoded with the VAE of config.vae.path.
  """
  labels = sample_lib.grid_labels(num, sample_lib.grid_rows(config) or 1)
  images = []
  for i, start in enumerate(range(0, num, batch_size)):
    chunk = labels[start : start + batch_size]
    # Pad the last batch so every batch compiles to the same program.
    padded = np.resize(chunk, batch_size) if len(chunk) < batch_size else chunk
    cond = sample_lib.label_cond(config, padded)
    out = sample_lib.generate(config, model, params, cond, jax.random.fold_in(key, i), batch_size)
    images.append(np.asarray(sample_lib.decode(config, out))[: len(chunk)])
  return np.concatenate(images), labels


def check_eval_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for an evaluation that cannot run, before any sampling (or training)."""
  if "eval" not in config:
    raise UserError("This config has no eval section; add config.eval (see configs/digits.py).")
  e = config.eval
  if e.metric not in METRICS:
    raise UserError(f"config.eval.metric must be one of {METRICS}, got {e.metric!r}.")
  if e.num_samples < 1 or e.batch_size < 1:
    raise UserError(
      f"config.eval.num_samples and batch_size must be positive, got {e.num_samples}, "
      f"{e.batch_size}."
    )
  if e.metric == "fid":
    for field in ("inception_path", "ref_stats"):
      if not e.get(field) or not os.path.exists(e[field]):
        raise UserError(f"config.eval.{field} must name an existing file, got {e.get(field)!r}.")
    channels = config.model.in_channels
    if channels not in (1, 3) and not sample_lib.vae_path(config):
      raise UserError(
        f"FID needs RGB images, but the model makes {channels}-channel latents and "
        "config.vae.path is empty; set it to the VAE that decodes them."
      )


def evaluate(config: ml_collections.ConfigDict, model, params, key: jax.Array) -> dict:
  """Samples config.eval.num_samples images and returns the metrics as floats."""
  check_eval_config(config)
  e = config.eval
  start = time.perf_counter()
  images, labels = generate_samples(config, model, params, key, e.num_samples, e.batch_size)
  if not np.all(np.isfinite(images)):
    raise FloatingPointError("The sampler produced NaN/Inf images; the checkpoint is broken.")
  result = {"num_samples": int(len(images)), "sample_seconds": time.perf_counter() - start}
  if e.metric == "digits":
    result.update(digits_metrics(config, images, labels))
  else:
    result.update(fid_metrics(config, images))
  return result


def digits_metrics(config, images: np.ndarray, labels: np.ndarray) -> dict:
  from dit.data import digits

  accuracy = metrics.digits_classifier_accuracy(images, labels)
  per_class = {
    f"accuracy_class_{k}": metrics.digits_classifier_accuracy(
      images[labels == k], labels[labels == k]
    )
    for k in np.unique(labels)
  }
  real, _ = digits.load_digits_arrays(config.data.resolution)
  feature_fn = metrics.digits_feature_fn()
  fd = metrics.fid_from_features(feature_fn(real), feature_fn(images))
  return {"accuracy": accuracy, "digits_fd": fd, **per_class}


def fid_metrics(config, images: np.ndarray) -> dict:
  from dit import fid_stats
  from dit.models import inception

  e = config.eval
  fn = inception.make_feature_fn(inception.load_inception_variables(e.inception_path))
  uint8 = sample_lib.to_uint8(images)
  if uint8.shape[-1] == 1:
    uint8 = np.repeat(uint8, 3, axis=-1)
  outputs = [
    fn(uint8[s : s + 500].astype(np.float32) / 127.5 - 1.0) for s in range(0, len(uint8), 500)
  ]
  pool = np.concatenate([np.asarray(o["pool"]) for o in outputs])
  logits = np.concatenate([np.asarray(o["logits_unbiased"]) for o in outputs])
  mu_ref, sigma_ref = fid_stats.load_reference_stats(e.ref_stats, dim=pool.shape[1])
  mu, sigma = metrics.feature_statistics(pool)
  is_mean, is_std = metrics.inception_score(logits)
  return {
    "fid": metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref),
    "inception_score": is_mean,
    "inception_score_std": is_std,
  }


# ---- Command line ----------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  flags.DEFINE_string("workdir", None, "Training workdir holding ckpt/; eval.json goes here.")
  flags.DEFINE_integer("seed", 0, "PRNG seed for the samples.")
  flags.DEFINE_bool("raw_params", False, "Evaluate the raw instead of the EMA parameters.")


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise UserError("--config and --workdir are required.")
  config = FLAGS.config
  model, params = sample_lib.load_params(config, FLAGS.workdir, use_ema=not FLAGS.raw_params)
  result = evaluate(config, model, params, jax.random.PRNGKey(FLAGS.seed))
  result.update(
    sampler=config.sample.sampler, steps=config.sample.steps, cfg_scale=config.sample.cfg_scale
  )
  path = os.path.join(FLAGS.workdir, "eval.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if not k.startswith("accuracy_class")}))


def cli() -> None:
  """Console-script entry point (`dit-evaluate`)."""
  define_flags()
  run_command(main)


if __name__ == "__main__":
  cli()
