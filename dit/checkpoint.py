"""Checkpoints: the one Orbax module. A workdir holds `config.json` and `ckpt/<step>/`.

Every checkpoint is a Composite of two items:
  state  the whole training state (`new_state`): step, params, ema_params, opt_state, rng and
         the non-finite step counters, in unstacked, unsharded shapes, so it restores onto any
         device count, mesh or parallelism.
  data   the input iterator's JSON state (points at the batch after the saved step).

Saves are asynchronous and atomic (written to a temporary directory, renamed when complete),
so a run killed mid-save keeps its previous checkpoints. A step that cannot be read (corrupt,
half deleted) is skipped for the previous one with a warning, both when training resumes
(`restore`) and when sampling (`restore_params`).

dit.train, dit.sample, dit.evaluate, the distillation teacher and the converters all read
and write through this module.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging

from dit import parallel
from dit.cli import UserError

State = dict[str, Any]


# ---- The workdir ----------------------------------------------------------------------


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` (its parent must exist), checks that it is writable; the absolute path."""
  workdir = os.path.abspath(workdir)
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise UserError(f"The parent of --workdir does not exist: {parent!r}.")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")  # One per host process.
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir {workdir!r} is not writable: {e.strerror}.") from e
  return workdir


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config as `workdir/config.json`."""
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json that dit.train or dit.models.convert wrote to `workdir`, locked."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"No --config given and {path!r} does not exist; pass --config.")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.lock()
  return config


# ---- The state ------------------------------------------------------------------------


def new_state(params: dict, tx: optax.GradientTransformation, rng: jax.Array) -> State:
  """The training state of fresh `params` (float32): EMA = params, a fresh optimizer state.

  rng: the key that every step's per-example randomness is folded from.
  """
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "ema_params": params,
    "opt_state": tx.init(params),
    "rng": rng,
    "bad_steps": jnp.zeros((), jnp.int32),  # Consecutive non-finite steps.
    "skipped_steps": jnp.zeros((), jnp.int32),  # All non-finite steps so far.
  }


def _handlers() -> dict:
  return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def manager(
  workdir: str, config: ml_collections.ConfigDict, best: bool = False
) -> ocp.CheckpointManager:
  """ckpt/: the last config.keep_ckpts steps; ckpt_best/: the best by config.eval.best_metric."""
  common = dict(create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True)
  if best:
    metric = config.eval.best_metric
    options = ocp.CheckpointManagerOptions(
      max_to_keep=1,
      best_fn=lambda metrics: metrics[metric],
      best_mode=config.eval.best_mode,
      keep_checkpoints_without_metrics=False,
      **common,
    )
    directory = os.path.join(workdir, "ckpt_best")
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_ckpts, **common)
    directory = os.path.join(workdir, "ckpt")
  return ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def save(
  mngr: ocp.CheckpointManager,
  state: State,
  data_state: dict,
  force: bool = False,
  metrics: dict | None = None,
) -> None:
  """Starts an async save of `state` (unstacked) and the data iterator state."""
  step = int(parallel.first_value(state["step"]))
  finite = _all_finite({"params": state["params"], "ema": state["ema_params"]})
  if not bool(parallel.first_value(finite)):
    raise FloatingPointError(f"Refusing to save a non-finite checkpoint at step {step}.")
  mngr.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
    force=force,
    metrics=metrics,
  )


def write_params(params: dict, config: ml_collections.ConfigDict, tx, workdir: str) -> str:
  """Writes `params` as step 0 of a training run in `workdir` (ckpt/ + config.json).

  For converters: the state is `new_state` of the params with the optimizer `tx`, so the
  workdir samples with dit.sample and fine-tunes with dit.train. Returns the absolute workdir.
  """
  workdir = prepare_workdir(workdir)
  ckpt_dir = os.path.join(workdir, "ckpt")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f"{ckpt_dir} already holds checkpoints; convert into a new --workdir.")
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]  # As dit.train's init.
  mngr = manager(workdir, config)
  save(mngr, new_state(params, tx, rng), {"step": 0}, force=True)
  mngr.wait_until_finished()
  write_config(workdir, config)
  return workdir


# ---- Restoring ------------------------------------------------------------------------


def shape_diffs(saved: dict[str, tuple], wanted: dict[str, tuple]) -> list[str]:
  """Differences between two {param path: shape} maps, as readable strings."""
  diffs = [f"{k}: missing from the checkpoint" for k in sorted(set(wanted) - set(saved))]
  diffs += [f"{k}: not in this model" for k in sorted(set(saved) - set(wanted))]
  diffs += [
    f"{k}: checkpoint {saved[k]}, config {wanted[k]}"
    for k in sorted(set(saved) & set(wanted))
    if saved[k] != wanted[k]
  ]
  return diffs


def _shapes(tree) -> dict[str, tuple]:
  return {
    parallel.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def _check_compatible(mngr, step: int, abstract_state: State) -> None:
  """Raises `UserError` naming the parameters whose saved shapes differ from the config's."""
  try:
    saved = mngr.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)["params"]
  except Exception:  # Unreadable metadata: the restore reports it.
    return
  diffs = shape_diffs(_shapes(saved), _shapes(abstract_state["params"]))
  if diffs:
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    raise UserError(
      f"The checkpoint at step {step} in {mngr.directory} was written for a different model "
      f"(params: {shown}); use a new --workdir or the matching config.model."
    )


def _newest_readable(mngr, restore_step: Callable[[int], Any]) -> tuple[Any, list[str]]:
  """restore_step(step) of the newest step that reads, with a warning per unreadable one.

  Returns (restored or None if there are no steps, the errors of the skipped steps); raises
  UserError if there are steps but none reads.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      return restore_step(step), errors
    except UserError:
      raise
    except Exception as e:  # Orbax raises many types for a damaged checkpoint.
      errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
      logging.warning("Checkpoint at step %d is unreadable (%s); trying an older one.", step, e)
      if jax.process_index() == 0:
        print(
          f"warning: checkpoint step {step} in {mngr.directory} is unreadable "
          f"({type(e).__name__}); falling back to the previous one.",
          file=sys.stderr,
        )
  if steps:
    raise UserError(
      f"No checkpoint in {mngr.directory} is readable ({'; '.join(errors)}). Move the "
      "directory away to start afresh."
    )
  return None, errors


def restore(mngr: ocp.CheckpointManager, abstract_state: State) -> tuple[State, dict] | None:
  """Restores the newest readable checkpoint onto the shardings of `abstract_state`.

  Returns (state, data iterator state), or None if there is no checkpoint. Leaves without a
  sharding go to the first local device; Orbax reshards, so the checkpoint may come from any
  device count or mesh. A step whose params do not fit `abstract_state` is a UserError.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with_sharding = lambda x: jax.ShapeDtypeStruct(
    x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device
  )
  abstract_state = jax.tree.map(with_sharding, abstract_state)

  def restore_step(step):
    _check_compatible(mngr, step, abstract_state)
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
    )
    restored = mngr.restore(step, args=args)
    return restored["state"], restored["data"]

  restored, _ = _newest_readable(mngr, restore_step)
  return restored


def restore_params(workdir: str, abstract_params: dict, use_ema: bool = True) -> dict:
  """The EMA (or raw) params of the newest readable checkpoint in `workdir/ckpt`.

  Restored as saved (no optimizer needed, so converted checkpoints of models dit.train cannot
  initialise load too), then checked against and cast to `abstract_params`
  (jax.ShapeDtypeStruct leaves): a mismatch is a UserError listing the differences.
  """
  ckpt_dir = os.path.join(os.path.abspath(workdir), "ckpt")
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"No checkpoints in {workdir!r} (expected {ckpt_dir}); train first.")
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers=_handlers())
  args = ocp.args.Composite(state=ocp.args.StandardRestore())
  try:
    state, _ = _newest_readable(mngr, lambda step: mngr.restore(step, args=args)["state"])
  except UserError as e:
    raise UserError(f"No readable checkpoint in {ckpt_dir} ({e}).") from e
  if state is None:
    raise UserError(f"No readable checkpoint in {ckpt_dir} (none).")
  params = state["ema_params" if use_ema else "params"]
  diffs = shape_diffs(_shapes(params), _shapes(abstract_params))
  if diffs:
    raise UserError(
      f"The checkpoint in {ckpt_dir} does not fit config.model ({len(diffs)} differences, e.g. "
      f"{diffs[:5]}); pass the config it was trained or converted with."
    )
  return jax.tree.map(lambda p, a: jnp.asarray(p, a.dtype), params, abstract_params)
