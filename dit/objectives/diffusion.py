"""The diffusion objective: eps / v / x0 prediction, learned sigma (hybrid VLB), min-SNR.

Each example draws its timestep t ~ U{0..T-1}, its noise and its classifier-free-guidance
dropout flag (probability config.model.class_dropout_prob: the label or caption is replaced
by the null one) from its own key. The loss is `dit.diffusion.losses.diffusion_loss`.
"""

from __future__ import annotations

import jax
import ml_collections

from dit.diffusion import losses, schedules
from dit.objectives.base import Apply, Objective, batch_cond, per_example


def make_objective(
  config: ml_collections.ConfigDict, apply: Apply, schedule: schedules.Schedule
) -> Objective:
  """The diffusion objective of config.diffusion for the model `apply`."""
  d = config.diffusion
  drop_prob = config.model.get("class_dropout_prob", 0.0)
  learn_sigma = config.model.learn_sigma

  def loss(params, batch, frozen):
    del frozen
    x0, keys = batch["x0"], batch["keys"]
    cond = batch_cond(batch)
    t = per_example(keys, lambda k: jax.random.randint(k, (), 0, schedule.T), 0)
    noise = per_example(keys, lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype), 1)
    cond["drop"] = per_example(keys, lambda k: jax.random.bernoulli(k, drop_prob), 2)
    per_row, _ = losses.diffusion_loss(
      lambda x_t, t: apply(params, x_t, t, cond),
      x0,
      keys[0],  # Unused: t and noise are given.
      schedule,
      prediction=d.prediction,
      weighting=d.weighting,
      min_snr_gamma=d.min_snr_gamma,
      learn_sigma=learn_sigma,
      t=t,
      noise=noise,
    )
    return per_row.mean(), {}

  return Objective(loss)
