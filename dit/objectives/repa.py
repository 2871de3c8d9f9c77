"""REPA: representation alignment (Yu et al. 2024) as a term added to another objective.

The DiT's hidden state after block config.model.repa_block goes through its projector MLP
(dit.models.dit.DiT, repa_* fields) and is aligned with a frozen encoder's patch features of
the clean image, token by token:

  loss = base loss + config.repa.weight * mean_b [ -mean_n cos(z_bn, y_bn) ]

y: the encoder's final-layernorm patch tokens (DINOv2's x_norm_patchtokens), resized as a
grid to the DiT's token grid when the two differ (bilinear). They come from
  source = "encoder":     the encoder (a Hugging Face DINOv2 directory, config.repa.encoder_path)
                          runs inside the jitted step on the training images, its params a
                          frozen input (placed like the params, never trained or saved);
  source = "precomputed": batch["repa"], written by `dit.data.precompute --repa_encoder`
                          (config.data.name = "precomputed"): the same features, read from disk.
The base objective (diffusion or flow matching) is unchanged: REPA only reads the features the
model's forward pass sows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dit.cli import UserError
from dit.models import dinov2
from dit.objectives.base import Objective

SOURCES = ("encoder", "precomputed")
ENCODERS = ("dinov2",)
# Batch entries besides x0 and the condition that the objective reads.
BATCH_KEYS = ("repa",)


def enabled(config: ml_collections.ConfigDict) -> bool:
  """REPA trains when config.model.repa_block > 0."""
  return config.model.get("repa_block", 0) > 0


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming a REPA setting that cannot train (before anything is built)."""
  if "repa" not in config:
    raise UserError(
      f"config.model.repa_block={config.model.repa_block} needs a config.repa section "
      "(weight, encoder, encoder_path, resolution, source; see configs/digits_repa.py)"
    )
  r = config.repa
  if r.source not in SOURCES:
    raise UserError(f"config.repa.source must be one of {SOURCES}, got {r.source!r}")
  if r.encoder not in ENCODERS:
    raise UserError(f"config.repa.encoder must be one of {ENCODERS}, got {r.encoder!r}")
  if not r.weight >= 0:
    raise UserError(f"config.repa.weight must be >= 0, got {r.weight!r}")
  if config.model.get("arch", "dit") != "dit":
    raise UserError(f"REPA needs config.model.arch='dit', got {config.model.arch!r}")
  if "distill" in config:
    raise UserError("REPA does not combine with consistency distillation (config.distill).")
  if r.source == "precomputed" and config.data.name != "precomputed":
    raise UserError(
      "config.repa.source='precomputed' reads batch['repa'], which only "
      f"config.data.name='precomputed' provides, got data.name={config.data.name!r}; "
      "write the features with `python -m dit.data.precompute --repa_encoder=DIR`"
    )


def load_encoder(config: ml_collections.ConfigDict) -> tuple[dinov2.Dinov2Config, dict]:
  """The frozen encoder of config.repa, checked against the model; UserError if unusable."""
  r = config.repa
  try:
    enc_config, params = dinov2.load_dinov2(r.encoder_path)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"config.repa.encoder_path: {e}") from e
  m = config.model
  if enc_config.hidden_size != m.repa_dim:
    raise UserError(
      f"config.model.repa_dim={m.repa_dim}, but the encoder {r.encoder_path!r} has features "
      f"of width {enc_config.hidden_size}; set repa_dim={enc_config.hidden_size}"
    )
  if m.in_channels not in (enc_config.num_channels, 1):
    raise UserError(
      f"the encoder {r.encoder_path!r} takes {enc_config.num_channels}-channel images, but "
      f"the model trains on {m.in_channels}-channel data (latents?): with source='encoder' it "
      "runs on the training images; precompute the features from the pixels instead "
      "(dit.data.precompute --repa_encoder, source='precomputed')"
    )
  return enc_config, params


def encoder_features(
  enc_config: dinov2.Dinov2Config, resolution: int
) -> Callable[[dict, jax.Array], jax.Array]:
  """`dinov2.repa_features` at `resolution` (0: the images as they are), which
  dit.data.precompute stores too; UserError for a resolution the encoder cannot take."""
  try:
    return dinov2.repa_features(enc_config, resolution or None)
  except ValueError as e:
    raise UserError(f"config.repa.resolution={resolution}: {e}") from e


def match_grid(features: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """(B, m * m, C) features of an m x m token grid -> (B, gh * gw, C), resized bilinearly as
  an image when the grids differ."""
  b, n, c = features.shape
  m = round(n**0.5)
  if m * m != n:
    raise ValueError(f"encoder features have {n} tokens, not a square grid")
  if (m, m) == tuple(grid):
    return features
  images = features.reshape(b, m, m, c)
  resized = jax.image.resize(images, (b, *grid, c), method="linear", antialias=True)
  return resized.reshape(b, grid[0] * grid[1], c)


def alignment_loss(z: jax.Array, y: jax.Array) -> jax.Array:
  """(B,) minus the cosine similarity of z and y (B, N, C), averaged over the N tokens."""
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  y = y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
  return -jnp.mean(jnp.sum(z * y, axis=-1), axis=-1)


def make_objective(
  config: ml_collections.ConfigDict,
  apply: Callable,
  schedule: Any,
  base: Callable[..., Objective],
) -> Objective:
  """`base(config, model_apply, schedule)` (the diffusion or flow objective) plus REPA.

  apply(params, x_t, t, cond) -> (output, intermediates): the model run with its
  intermediates collection mutable (dit.train.make_apply(..., intermediates=True)).
  """
  check_config(config)
  r, p = config.repa, config.model.patch_size
  # The base objective calls the model once per loss; the projection that call sows is kept
  # here for the alignment term (same trace, so the same forward pass and its gradient).
  sown: list[jax.Array] = []

  def model_apply(params, x_t, t, cond):
    out, intermediates = apply(params, x_t, t, cond)
    sown.append(intermediates["repa"][0])
    return out

  base_objective = base(config, model_apply, schedule)
  frozen = dict(base_objective.frozen)
  if r.source == "encoder":
    enc_config, frozen["repa_encoder"] = load_encoder(config)
    features = encoder_features(enc_config, r.resolution)

  def loss(params, batch, frozen):
    sown.clear()
    value, metrics = base_objective.loss(params, batch, frozen)
    if len(sown) != 1:
      raise RuntimeError(
        f"REPA expects one model call per loss, the base objective made {len(sown)}"
      )
    z = sown.pop()
    if r.source == "encoder":
      y = features(frozen["repa_encoder"], batch["x0"])
    elif "repa" in batch:
      y = batch["repa"].astype(jnp.float32)
    else:
      raise UserError("config.repa.source='precomputed', but the batch holds no 'repa' features")
    _, h, w, _ = batch["x0"].shape
    y = match_grid(jax.lax.stop_gradient(y), (h // p, w // p))
    if y.shape[-1] != z.shape[-1]:
      raise UserError(
        f"REPA features have width {y.shape[-1]} but config.model.repa_dim={z.shape[-1]}"
      )
    align = alignment_loss(z, y).mean()
    return value + r.weight * align, {**metrics, "repa_align": align}

  return Objective(loss, frozen, base_objective.init_params)
