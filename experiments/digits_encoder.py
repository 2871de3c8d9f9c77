"""A tiny DINOv2 trained on digits: the frozen encoder of REPA on the 8x8 digits demo.

  python -m experiments.digits_encoder --out=runs/digits_encoder [--steps=1000] [--seed=0]

DINOv2 features mean nothing on 8x8 grey digits, so this trains a 4-layer, 64-wide ViT with
DINOv2's architecture (dit.models.dinov2) on the digits training split (dit.metrics' 80%, the
split whose other 20% scores the digits classifier) and writes it with `dinov2.save_hf`, as
config.json + model.safetensors: `dinov2.load_dinov2(out)` and transformers'
`Dinov2Model.from_pretrained(out)` read it like a released DINOv2. Patch size 2 gives a 4x4
token grid, the digits DiT's with patch 2.

Objective: supervised classification from the CLS token and from the mean of the patch tokens
(after the final layer norm), one linear head each (heads are not saved), so that the patch
tokens REPA aligns to carry the digit's class, not only the CLS token. Images are augmented
by random 1-pixel shifts and small Gaussian noise. The encoder trains through
`dinov2.make_features(config, resolution=None, value_range=(-1, 1), antialias=False)`, the
call REPA makes on (B, 8, 8, 1) images in [-1, 1], so REPA sees the features it trained on.

num_channels is 3: make_features repeats the grey digits to RGB before the ImageNet
normalisation, as it does for a released DINOv2, so REPA treats this encoder like one (a
1-channel encoder also works: preprocess then normalises by the mean of the RGB statistics).

Writes <out>/config.json, <out>/model.safetensors and <out>/train.json (config, steps, seed,
losses, held-out accuracy of both heads, wall time) and prints a one-line summary. All
randomness comes from --seed (initialisation, batches, augmentation); the same seed gives
the same weights on the same machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from dit import cli, metrics
from dit.cli import UserError
from dit.models import dinov2

NUM_CLASSES = 10
SPLIT_SEED = 0  # dit.metrics' split: the held-out 20% is the digits classifier's.
SHIFT = 1  # Random translation of up to this many pixels (background -1 fills in).
NOISE_STD = 0.05  # Gaussian pixel noise in [-1, 1] units (grey levels are 0.125 apart).
WEIGHT_DECAY = 0.05
STEPS, BATCH_SIZE, LR = 1000, 96, 2e-3  # About a minute on 2 CPU cores.


def encoder_config() -> dinov2.Dinov2Config:
  """The stand-in DINOv2: 8x8 input, patch 2 (16 tokens + CLS), 64 wide, 4 layers, 4 heads."""
  return dinov2.Dinov2Config(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    mlp_ratio=4.0,
    image_size=8,
    patch_size=2,
    num_channels=3,  # Grey repeated to RGB by make_features (module docstring).
  )


def feature_fn(config: dinov2.Dinov2Config) -> Callable[[dict, jax.Array], dict]:
  """features(params, images (B, 8, 8, 1) in [-1, 1]) -> dict, the call REPA makes."""
  return dinov2.make_features(config, resolution=None, value_range=(-1.0, 1.0), antialias=False)


@functools.lru_cache(maxsize=1)
def training_split() -> tuple[np.ndarray, np.ndarray]:
  """The digits the encoder trains on: (N, 8, 8, 1) float32 in [-1, 1] and (N,) int32 labels.

  dit.metrics' 80% (seed SPLIT_SEED), scaled as dit.data.digits (grey / 16 * 2 - 1, exact).
  """
  x, y = metrics._digits_split(SPLIT_SEED)[:2]
  return _read_only((x.reshape(-1, 8, 8, 1) / 8.0 - 1.0).astype(np.float32), y.astype(np.int32))


@functools.lru_cache(maxsize=1)
def held_out_split() -> tuple[np.ndarray, np.ndarray]:
  """The other 20% (`dit.metrics.digits_held_out`), never trained on."""
  x, y = metrics.digits_held_out(SPLIT_SEED)
  return _read_only(x, y.astype(np.int32))


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  for a in arrays:
    a.setflags(write=False)  # Cached: a caller's edit would change every later run.
  return arrays


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """(B, H, W, C) in [-1, 1] -> shifted by up to SHIFT pixels each way, plus noise, clipped."""
  b, h, w, c = images.shape
  k_shift, k_noise = jax.random.split(key)
  pad = ((0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0))
  padded = jnp.pad(images, pad, constant_values=-1.0)
  offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * SHIFT + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  x = jax.vmap(crop)(padded, offsets)
  x = x + NOISE_STD * jax.random.normal(k_noise, x.shape, x.dtype)
  return jnp.clip(x, -1.0, 1.0)


def _logits(config: dinov2.Dinov2Config, params: dict, images: jax.Array) -> dict:
  """{"cls": (B, 10), "patch": (B, 10) from the patch mean, "tokens": (B, N, 10) per patch}."""
  out = feature_fn(config)(params["encoder"], images)
  heads = params["heads"]
  head = lambda name, f: f @ heads[name]["w"] + heads[name]["b"]
  return {
    "cls": head("cls", out["cls"]),
    "patch": head("patch", out["patch"].mean(axis=1)),
    "tokens": head("patch", out["patch"]),  # Linear head: their mean is the "patch" logits.
  }


def _loss(config, params, images, labels) -> jax.Array:
  logits = _logits(config, params, images)
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
  return ce(logits["cls"]) + ce(logits["patch"])


@functools.lru_cache(maxsize=4)
def _initializer(config: dinov2.Dinov2Config):
  """Jitted init(seed) -> {"encoder": `dinov2.init_params(config, seed)`, "heads": ...}.

  The heads are linear (LeCun normal, zero bias). Cached: init_params jits anew per call.
  """
  d = config.hidden_size
  size = config.grid_size * config.patch_size
  x = jnp.zeros((1, size, size, config.num_channels), jnp.float32)

  def init(seed):
    k_cls, k_patch = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1))
    head = lambda k: {
      "w": jax.random.normal(k, (d, NUM_CLASSES), jnp.float32) / np.sqrt(d),
      "b": jnp.zeros((NUM_CLASSES,), jnp.float32),
    }
    encoder = dinov2.Dinov2(config).init(jax.random.key(seed), x)  # As init_params.
    return {"encoder": encoder, "heads": {"cls": head(k_cls), "patch": head(k_patch)}}

  return jax.jit(init)


def _optimizer(steps: int, lr: float) -> optax.GradientTransformation:
  warmup = min(100, steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.01)
  # Decay matrices only, not norms, biases, layer scales or embeddings.
  decay = lambda p: jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], "key", None) in ("kernel", "w"), p
  )
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, weight_decay=WEIGHT_DECAY, mask=decay),
  )


@functools.lru_cache(maxsize=8)
def _trainer(config: dinov2.Dinov2Config, steps: int, batch_size: int, lr: float):
  """Jitted train(params, key, images, labels) -> (params, (steps,) losses), one scan.

  Cached on its static arguments, so repeated runs (tests, seeds) compile once.
  """
  tx = _optimizer(steps, lr)
  grad_fn = jax.value_and_grad(functools.partial(_loss, config))

  def train(params, key, images, labels):
    def step(carry, k):
      params, opt_state = carry
      k_batch, k_aug = jax.random.split(k)
      idx = jax.random.choice(k_batch, labels.shape[0], (batch_size,), replace=False)
      loss, grads = grad_fn(params, augment(k_aug, images[idx]), labels[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    carry = (params, tx.init(params))
    (params, _), losses = jax.lax.scan(step, carry, jax.random.split(key, steps))
    return params, losses

  return jax.jit(train)


@functools.lru_cache(maxsize=4)
def _scorer(config: dinov2.Dinov2Config):
  def score(params, images, labels):
    logits = _logits(config, params, images)
    acc = lambda z: (z.argmax(-1) == labels[(...,) + (None,) * (z.ndim - 2)]).mean()
    return {
      "cls_accuracy": acc(logits["cls"]),
      "patch_accuracy": acc(logits["patch"]),
      "patch_token_accuracy": acc(logits["tokens"]),
    }

  return jax.jit(score)


def train_encoder(
  steps: int = STEPS,
  seed: int = 0,
  batch_size: int = BATCH_SIZE,
  lr: float = LR,
  config: dinov2.Dinov2Config | None = None,
) -> tuple[dinov2.Dinov2Config, dict, dict[str, Any]]:
  """Trains the stand-in DINOv2 (`encoder_config()` unless `config`) on the digits training split.

  Returns (config, params, metrics): params = {"params": ...} of `dinov2.Dinov2` (what
  `save_hf` writes; the heads are dropped); metrics: "losses" (steps,) per-step training
  loss (CE of the CLS head + CE of the patch-mean head, augmented batches),
  "final_train_loss" (mean of the last min(50, steps)), and on the held-out split
  "cls_accuracy", "patch_accuracy" (patch-mean head) and "patch_token_accuracy" (the
  patch-mean head on each patch token alone, averaged: how much one token knows).
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  x_train, y_train = training_split()
  if not 1 <= batch_size <= len(y_train):
    raise ValueError(
      f"batch_size must be in [1, {len(y_train)}] (the training split), got {batch_size}."
    )
  config = config or encoder_config()
  if config.grid_size * config.patch_size != 8 or config.num_channels not in (1, 3):
    raise ValueError(
      f"The digits encoder takes 8x8 grey images: image_size and patch_size must make an "
      f"8 x 8 grid of pixels and num_channels be 1 or 3, got {config}."
    )
  train = _trainer(config, int(steps), int(batch_size), float(lr))
  params, losses = train(_initializer(config)(seed), jax.random.key(seed), x_train, y_train)
  losses = np.asarray(jax.device_get(losses), np.float64)
  x_test, y_test = held_out_split()
  scores = jax.device_get(_scorer(config)(params, x_test, y_test))
  out = {
    "losses": losses,
    "final_train_loss": float(losses[-min(50, steps) :].mean()),
    **{k: float(v) for k, v in scores.items()},
    "train_size": len(y_train),
    "held_out_size": len(y_test),
  }
  return config, params["encoder"], out


def run(
  out: str | None,
  steps: int = STEPS,
  seed: int = 0,
  batch_size: int = BATCH_SIZE,
  config: dinov2.Dinov2Config | None = None,
) -> dict:
  """Trains (`train_encoder`), writes `out` (save_hf + train.json), returns train.json's dict.

  UserError (one line) for a missing `out` or a non-positive `steps` / `batch_size`.
  """
  if not out:
    raise UserError(
      "--out is required: the directory to write the encoder to (e.g. --out=runs/digits_encoder)."
    )
  if steps is None or steps < 1:
    raise UserError(f"--steps must be a positive integer, got {steps}.")
  if batch_size is None or batch_size < 1:
    raise UserError(f"--batch_size must be a positive integer, got {batch_size}.")
  start = time.perf_counter()
  try:
    config, params, m = train_encoder(steps, seed, batch_size, config=config)
  except ValueError as e:
    raise UserError(str(e)) from e
  wall = time.perf_counter() - start
  dinov2.save_hf(out, config, params)
  losses = m.pop("losses")
  record = {
    "config": dataclasses.asdict(config),
    "steps": steps,
    "seed": seed,
    "batch_size": batch_size,
    "first_train_loss": float(losses[0]),
    **m,
    "loss_every_100_steps": [float(v) for v in losses[::100]],
    "wall_time_s": round(wall, 1),
  }
  with open(os.path.join(out, "train.json"), "w") as f:
    json.dump(record, f, indent=2)
  return record


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("out", None, "Output directory (config.json, model.safetensors, train.json).")
  flags.DEFINE_integer("steps", STEPS, "Training steps.")
  flags.DEFINE_integer("seed", 0, "PRNG seed (initialisation, batches, augmentation).")
  flags.DEFINE_integer("batch_size", BATCH_SIZE, "Images per step.")


def main(argv) -> None:
  del argv
  r = run(FLAGS.out, FLAGS.steps, FLAGS.seed, FLAGS.batch_size)
  print(
    f"digits encoder -> {FLAGS.out}: {r['steps']} steps, seed {r['seed']}, "
    f"train loss {r['final_train_loss']:.3f}, held-out accuracy CLS {r['cls_accuracy']:.3f} / "
    f"patch mean {r['patch_accuracy']:.3f} / single patch {r['patch_token_accuracy']:.3f}, "
    f"{r['wall_time_s']:.0f} s"
  )


if __name__ == "__main__":
  cli.run_command(main, define_flags, __doc__)
