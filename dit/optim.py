"""The optimizer of config.optim: AdamW with warmup, constant or cosine decay, clipping."""

from __future__ import annotations

import ml_collections
import optax

from dit.cli import UserError

LR_SCHEDULES = ("constant", "cosine")


def make_optimizer(
  config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW with linear warmup then constant or cosine decay and global-norm clip, lr schedule)."""
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
  tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, lr
