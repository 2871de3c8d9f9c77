"""Evaluation library: sample a model, compute metrics (used by dit.evaluate and the train loop).

config.eval.metric picks the metrics:
- "digits": conditional accuracy of a classifier fitted on the real digits (is a sample of
  class k recognised as k?) and a Frechet distance in that classifier's feature space
  against the real digits (an FID-like number that runs in seconds).
- "fid": FID (and Inception Score) with the FID InceptionV3 (config.eval.inception_path,
  pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`) against reference statistics
  (config.eval.ref_stats: an ADM/pytorch-fid `.npz`). Latent models are decoded with the
  VAE in config.vae.path.
- "fd_dinov2": the Frechet distance on DINOv2 CLS features, EDM2's protocol (see
  `fid_stats.dinov2_cls_fn`), with the Hugging Face DINOv2 directory config.eval.dinov2_path
  (facebook/dinov2-large) against config.eval.dinov2_ref_stats (`python -m dit.fid_stats
  --feature=dinov2`).
A comma-separated list ("fid,fd_dinov2") computes several on the same samples.

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
  names = metric_names(e.metric)
  if e.num_samples < 1 or e.batch_size < 1:
    raise UserError(
      f"config.eval.num_samples and batch_size must be positive, got {e.num_samples}, "
      f"{e.batch_size}."
    )
  files = {"fid": ("inception_path", "ref_stats"), "fd_dinov2": ("dinov2_ref_stats",)}
  for name in names:
    for field in files.get(name, ()):
      if not e.get(field) or not os.path.exists(e[field]):
        raise UserError(f"config.eval.{field} must name an existing file, got {e.get(field)!r}.")
  if "fd_dinov2" in names:
    from dit.models import dinov2

    if "dinov2_path" not in e:
      raise UserError(
        "config.eval has no dinov2_path: add c.eval.dinov2_path (a Hugging Face DINOv2 "
        "directory, facebook/dinov2-large for EDM2's FD-DINOv2) to the config file."
      )
    try:
      dinov2.check_model_dir(e.dinov2_path)
    except (OSError, ValueError) as err:
      raise UserError(f"config.eval.dinov2_path: {err}") from err
  if set(names) & {"fid", "fd_dinov2"}:
    channels = config.model.in_channels
    if channels not in (1, 3) and not generate.vae_path(config):
      raise UserError(
        f"{'FID' if 'fid' in names else 'FD-DINOv2'} needs RGB images, but the model makes "
        f"{channels}-channel latents and config.vae.path is empty; set it to the VAE that "
        "decodes them."
      )


def metric_names(metric: str) -> tuple[str, ...]:
  """config.eval.metric ("fid" or a comma-separated list "fid,fd_dinov2") -> the names;
  UserError for an unknown or empty one."""
  names = tuple(m.strip() for m in str(metric).split(","))
  bad = [m for m in names if m not in METRICS]
  if bad or len(set(names)) != len(names):
    raise UserError(
      f"config.eval.metric must be one of {tuple(METRICS)} or a comma-separated list of "
      f"distinct ones, got {metric!r}."
    )
  return names


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
  for name in metric_names(e.metric):
    result.update(METRICS[name](config, images, labels))
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
  uint8 = _uint8_rgb(images)
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


def fd_dinov2_metrics(config, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
  """FD-DINOv2 (EDM2): the samples quantised to 8 bits, as the reference images are."""
  del labels  # Unconditional, as FID.
  e = config.eval
  fn = fid_stats.dinov2_cls_fn(e.dinov2_path)
  features = fid_stats.features_of_images(_uint8_rgb(images), fn)
  mu_ref, sigma_ref = fid_stats.load_reference_stats(e.dinov2_ref_stats, dim=features.shape[1])
  mu, sigma = metrics.feature_statistics(features)
  return {"fd_dinov2": metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)}


def _uint8_rgb(images: np.ndarray) -> np.ndarray:
  """[-1, 1] images (N, H, W, 1 or 3) -> uint8 RGB, as the reference images are stored."""
  uint8 = generate.to_uint8(images)
  return np.repeat(uint8, 3, axis=-1) if uint8.shape[-1] == 1 else uint8


# config.eval.metric -> metrics(config, images (N, H, W, C) in [-1, 1], labels (N,)) -> dict.
METRICS = {"digits": digits_metrics, "fid": fid_metrics, "fd_dinov2": fd_dinov2_metrics}


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
