"""What every objective shares: the `Objective` record and per-example randomness."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

Array = jax.Array
# apply(params, x_t (B, H, W, C), t (B,), cond) -> model output (B, H, W, C_out).
Apply = Callable[[Any, Array, Array, dict], Array]
# loss(params, batch, frozen) -> (scalar loss, {name: scalar} metrics).
Loss = Callable[[Any, dict, dict], tuple[Array, dict[str, Array]]]

# resolution (B, 2), aspect_ratio (B, 1): PixArt-alpha micro-conditioning (size_conditioning);
# pooled (B, P): a pooled text vector (MMDiT / Flux with pooled_channels > 0).
COND_KEYS = ("label", "text", "text_mask", "resolution", "aspect_ratio", "pooled")


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective, built once from the config.

  loss(params, batch, frozen) -> (loss, metrics): `batch` holds "x0" (B, H, W, C) (images or
    latents), "keys" (B,) PRNG keys, one per example, and the condition (COND_KEYS); `frozen`
    holds the objective's frozen inputs plus "ema_params", the current EMA params (a target
    network), which the update step adds. Metrics are scalars, averaged like the loss.
  frozen: host pytrees the loss needs but never trains (a teacher's params, an encoder's):
    placed like the params, never checkpointed.
  init_params: (fresh params, frozen) -> the initial params (a student starts as its
    teacher), or None for the fresh ones.
  """

  loss: Loss
  frozen: dict = dataclasses.field(default_factory=dict)
  init_params: Callable[[dict, dict], dict] | None = None


def per_example(keys: Array, fn: Callable[[Array], Array], i: int) -> Array:
  """fn(key) for each example's i-th subkey, (B, ...).

  Draws from per-example keys do not depend on how the batch is split over devices, hosts or
  micro-batches.
  """
  return jax.vmap(lambda k: fn(jax.random.fold_in(k, i)))(keys)


def batch_cond(batch: dict) -> dict:
  """The condition entries of a batch (labels, caption embeddings and mask, image sizes)."""
  return {k: batch[k] for k in COND_KEYS if k in batch}
