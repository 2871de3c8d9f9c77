"""The optimizer of config.optim: AdamW with warmup, constant or cosine decay, clipping.

With config.parametrization = "mup" (dit/mup.py) the AdamW is split into muP's param groups
by `optax.multi_transform`: group g runs AdamW with lr * k_g and weight_decay / k_g, k_g its
learning-rate factor (1 for input and fixed params, 1 / width_mult for hidden and output).
That is microsoft/mup's MuAdamW: the Adam step shrinks with width, the decoupled decay per
step (lr * weight_decay) does not. The standard parametrization ("sp", the default) is the
one AdamW of before.
"""

from __future__ import annotations

import ml_collections
import optax

from dit import mup
from dit.cli import UserError

LR_SCHEDULES = ("constant", "cosine")


def make_optimizer(
  config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW with linear warmup then constant or cosine decay and global-norm clip, lr schedule).

  The schedule is the base learning rate (that of muP's input group); config.parametrization
  is checked here (UserError).
  """
  o = config.optim
  if o.schedule == "constant":
    lr = optax.constant_schedule(o.lr)
  elif o.schedule == "cosine":
    lr = optax.cosine_decay_schedule(o.lr, max(1, config.total_steps - o.warmup_steps))
  else:
    raise UserError(f"config.optim.schedule must be one of {LR_SCHEDULES}, got {o.schedule!r}.")
  if o.warmup_steps > 0:
    warmup = optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    lr = optax.join_schedules([warmup, lr], [o.warmup_steps])
  if mup.enabled(config):
    tx = mup_adamw(config, lr)
  else:
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, lr


def mup_adamw(
  config: ml_collections.ConfigDict, lr: optax.Schedule
) -> optax.GradientTransformation:
  """MuAdamW: one AdamW per muP group (dit.mup.param_groups) with lr * k, weight_decay / k."""
  o = config.optim
  groups = mup.param_groups(config)
  m = mup.width_mult(config)

  def group_adamw(name):
    k = mup.LR_SCALE[name](m)
    return optax.adamw(lambda step: k * lr(step), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay / k)

  return optax.multi_transform({name: group_adamw(name) for name in mup.GROUPS}, groups)
