"""Evaluation library: sample a model, compute metrics (used by dit.evaluate and the train loop).

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

import os
import textwrap
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from dit import fid_stats, generate, metrics
from dit.cli import UserError
from dit.diffusion import flow, flow_samplers, samplers, schedules


def generate_samples(config, model, params, key, num: int, batch_size: int, progress=False):
  """(num, H, W, C) images in [-1, 1] and their labels (num,), class-balanced; with
  `progress`, a tqdm bar (images, rate, ETA) on stderr.

  Class models are conditioned on the labels, text models on the digit prompts of
  config.sample.prompt_template; latents are decoded with the VAE of config.vae.path.
  """
  labels = generate.grid_labels(num, generate.grid_rows(config) or 1)
  images = []
  bar = tqdm(total=num, desc="sampling", unit="img", disable=not progress)
  for i, start in enumerate(range(0, num, batch_size)):
    chunk = labels[start : start + batch_size]
    # Pad the last batch so every batch compiles to the same program.
    padded = np.resize(chunk, batch_size) if len(chunk) < batch_size else chunk
    cond = generate.label_cond(config, padded)
    out = generate.generate(config, model, params, cond, jax.random.fold_in(key, i), batch_size)
    images.append(np.asarray(generate.decode(config, out))[: len(chunk)])
    bar.update(len(chunk))
  bar.close()
  return np.concatenate(images), labels


def check_eval_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for an evaluation that cannot run, before any sampling (or training):
  bad eval settings, and sampler settings (guidance scale, eta, steps) that cannot work."""
  generate.check_sample_config(config)
  generate.sampler_settings(config)
  if "eval" not in config:
    raise UserError("This config has no eval section; add config.eval (see configs/digits.py).")
  e = config.eval
  if e.metric not in METRICS:
    raise UserError(f"config.eval.metric must be one of {tuple(METRICS)}, got {e.metric!r}.")
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
    if channels not in (1, 3) and not generate.vae_path(config):
      raise UserError(
        f"FID needs RGB images, but the model makes {channels}-channel latents and "
        "config.vae.path is empty; set it to the VAE that decodes them."
      )


def evaluate(
  config: ml_collections.ConfigDict, model, params, key: jax.Array, progress: bool = False
) -> dict:
  """Samples config.eval.num_samples images and returns the metrics as floats (with
  `progress`, a tqdm bar over the sampling)."""
  check_eval_config(config)
  e = config.eval
  start = time.perf_counter()
  images, labels = generate_samples(
    config, model, params, key, e.num_samples, e.batch_size, progress
  )
  if not np.all(np.isfinite(images)):
    raise FloatingPointError("The sampler produced NaN/Inf images; the checkpoint is broken.")
  result = {"num_samples": int(len(images)), "sample_seconds": time.perf_counter() - start}
  result.update(METRICS[e.metric](config, images, labels))
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


def fid_metrics(config, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
  del labels  # FID is unconditional.
  from dit.models import inception

  e = config.eval
  fn = inception.make_feature_fn(inception.load_inception_variables(e.inception_path))
  uint8 = generate.to_uint8(images)
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


# config.eval.metric -> metrics(config, images (N, H, W, C) in [-1, 1], labels (N,)) -> dict.
METRICS = {"digits": digits_metrics, "fid": fid_metrics}


def config_choices() -> dict[str, tuple[str, ...]]:
  """The valid values of the config's enumerated keys (for the commands' --help)."""
  return {
    "sample.sampler (diffusion)": tuple(samplers.SAMPLERS),
    "sample.sampler (flow)": tuple(flow_samplers.FLOW_SAMPLERS),
    "diffusion.schedule": schedules.BETA_SCHEDULES,
    "diffusion.prediction": schedules.PREDICTIONS,
    "flow.interpolant": flow.INTERPOLANTS,
    "flow.target": flow.TARGETS,
    "flow.time_sampler": flow.TIME_SAMPLERS,
    "eval.metric": tuple(METRICS),
    "optim.schedule": ("constant", "cosine"),
    "parallelism": ("pmap", "mesh"),
  }


def choices_text(keys: tuple[str, ...] | None = None) -> str:
  """ "Valid values of enumerated config keys:" lines for `keys` (default: all)."""
  choices = config_choices()
  lines = ["Valid values of enumerated config keys:"]
  for key in keys or tuple(choices):
    text = f"{key}: {', '.join(choices[key])}"
    lines.append(textwrap.fill(text, 100, initial_indent="  ", subsequent_indent="    "))
  return "\n".join(lines)
