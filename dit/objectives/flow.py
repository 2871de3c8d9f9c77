"""The flow-matching objective: velocity / noise / x0 targets on a linear, GVP or VP path.

Each example draws its time from config.flow.time_sampler (then shifted by the flow's shift),
its noise and its classifier-free-guidance dropout flag from its own key; the loss is
`dit.diffusion.flow.flow_loss`, weighted by config.flow.weighting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from dit.diffusion import flow as flow_lib
from dit.objectives.base import Apply, Objective, batch_cond, per_example


def make_objective(config: ml_collections.ConfigDict, apply: Apply) -> Objective:
  """The flow-matching objective of config.flow for the model `apply`."""
  flow = flow_lib.from_config(config)
  f = flow_lib.fields(config.flow)
  lo, hi = flow.t_range
  drop_prob = config.model.get("class_dropout_prob", 0.0)
  # Flow matching learns no variance; a model with variance channels (SiT's checkpoints keep
  # DiT's learn_sigma=True layout) trains and samples its first C channels only.
  channels = config.model.in_channels

  def draw_time(key):
    t = flow_lib.sample_time(
      key,
      (),
      f["time_sampler"],
      logit_mean=f["logit_mean"],
      logit_std=f["logit_std"],
      mode_scale=f["mode_scale"],
    )
    return jnp.clip(flow_lib.shift_time(t, flow.shift), lo, hi)

  def loss(params, batch, frozen):
    del frozen
    x0, keys = batch["x0"], batch["keys"]
    cond = batch_cond(batch)
    t = per_example(keys, draw_time, 0)
    noise = per_example(keys, lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype), 1)
    cond["drop"] = per_example(keys, lambda k: jax.random.bernoulli(k, drop_prob), 2)
    per_row, _ = flow_lib.flow_loss(
      lambda x_t, model_t: apply(params, x_t, model_t, cond)[..., :channels],
      flow,
      x0,
      t,
      noise,
      weighting=f["weighting"],
    )
    return per_row.mean(), {}

  return Objective(loss)
