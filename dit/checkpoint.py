"""Checkpoints: the one Orbax module. A workdir holds `config.json` and `ckpt/<step>/`.

The workdir contract of every command (`command_config`): `--workdir` alone runs with
`config.json`; `--config` (or `--config.KEY=VALUE` overrides) on a workdir that has one is
compared with it field by field. Changes dit.train accepts on resume are appended to
`config_history.jsonl` (`record_config_history`), so config.json always holds the config of
the latest start and the history every change before it.

Every checkpoint is a Composite of three items, committed together (atomically):
  state      the whole training state (`new_state`): step, params, ema_params, opt_state, rng
             and the non-finite step counters, in unstacked, unsharded shapes, so it restores
             onto any device count, mesh or parallelism.
  data       the input iterator's JSON state (points at the batch after the saved step).
  checksums  a content checksum per array of `state` (and one of `data`), computed on the
             devices when the step is saved (`checksums`); checkpoints written before it
             existed have none and restore "unverified".

Saves are asynchronous and atomic (written to a temporary directory, renamed when complete),
so a run killed mid-save keeps its previous checkpoints. Every restore verifies the step: it
must read, match its checksums, and hold only finite params, EMA and optimizer state. A step
that fails is skipped for the previous one with a warning naming what failed, both when
training resumes (`restore`) and when sampling (`restore_params`). When training resumes
from an older step, the failed newer ones are moved aside to `ckpt/corrupt/<step>-<time>/`
(nothing is deleted), so the run saves those steps again. `python -m dit.checkpoint verify
WORKDIR` reports every step's status.

dit.train, dit.sample, dit.evaluate, the distillation teacher and the converters all read
and write through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from dit import parallel
from dit.cli import UserError, apply_overrides, config_diffs

State = dict[str, Any]

CHECKSUMS = "checksums"  # The checkpoint item holding the checksums.
CHECKSUM_ALGORITHM = "dit-mix32x2-v1"  # See `_leaf_checksum`.
CORRUPT = "corrupt"  # ckpt/corrupt/<step>-<time>: steps that failed verification.


class CorruptCheckpoint(Exception):
  """A checkpoint step that reads but fails verification (checksums, non-finite values)."""


# ---- The workdir ----------------------------------------------------------------------


def check_workdir(workdir: str) -> str:
  """The absolute path of `workdir`, whose parent must exist; creates nothing."""
  workdir = os.path.abspath(workdir)
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise UserError(f"The parent of --workdir does not exist: {parent!r}.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir!r} is not writable: it is a file, not a directory.")
  return workdir


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
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is not a readable config.json ({e}); pass --config.") from e
  config.lock()
  return config


CONFIG_HISTORY = "config_history.jsonl"
# Keys that change how a model computes, not what its parameters mean: free at sampling time.
COMPUTE_ONLY_KEYS = (
  "model.dtype",
  "model.remat",
  "model.remat_policy",
  "model.scan",
  "model.attention_impl",
)


def _saved_config(workdir: str | None) -> dict | None:
  path = os.path.join(workdir, "config.json") if workdir else None
  if path is None or not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def config_changes(old: dict, new: dict, sections=None, ignore=()) -> list[tuple[str, Any, Any]]:
  """(dotted key, old, new) of the leaves that differ, in `sections` (default: all); a key
  that a newer config added, left empty (None or ""), is no change."""
  sections = sorted(set(old) | set(new)) if sections is None else sections
  return [
    (key, a, b)
    for key, a, b in config_diffs(old, new, sections, ignore=ignore)
    if not (a is None and b in ("", None))
  ]


def describe_changes(changes) -> str:
  """ "key old -> new; ..." for a console line."""
  return "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


def command_config(
  workdir: str | None,
  config: ml_collections.ConfigDict | None = None,
  overrides=(),
  fixed: tuple[str, ...] = (),
  ignore: tuple[str, ...] = COMPUTE_ONLY_KEYS,
) -> tuple[ml_collections.ConfigDict, list[tuple[str, Any, Any]]]:
  """The config a command runs with, and how it differs from workdir/config.json.

  config: --config (with its overrides, applied by config_flags); None: workdir/config.json
  with `overrides` ("key=value": --config.KEY=VALUE given without --config).
  fixed: sections (e.g. "model", "diffusion") that must equal config.json's, in the keys both
  have (keys in `ignore` may differ), else a UserError lists the differences.
  Returns (config, [(key, config.json's value, the config's value)]; [] without config.json).
  """
  if config is None:
    if workdir is None:
      raise UserError("Give --workdir (it holds config.json) or --config.")
    config = apply_overrides(read_config(workdir), list(overrides))
  saved = _saved_config(workdir)
  if saved is None:
    return config, []
  new = json.loads(config.to_json_best_effort())
  differ = config_changes(_common(saved, new), _common(new, saved), fixed, ignore)
  if differ:
    raise UserError(
      f"The config changes the model of {workdir}/config.json, which its checkpoints were "
      f"trained with: {describe_changes(differ)}; use the trained model's settings (leave out "
      "--config and these overrides)."
    )
  return config, config_changes(saved, new)


def _common(a: dict, b: dict) -> dict:
  """`a` without the keys `b` lacks, at every level (configs of other code versions)."""
  return {k: _common(v, b[k]) if isinstance(v, dict) and isinstance(b[k], dict) else v
          for k, v in a.items() if k in b}  # fmt: skip


def record_config_history(workdir: str, step: int, changes=(), **fields) -> str:
  """Appends {"step", "time", "changes": {key: [old, new]}, **fields} to the workdir's
  config_history.jsonl (process 0); returns its path."""
  path = os.path.join(workdir, CONFIG_HISTORY)
  if jax.process_index() == 0:
    row = {"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if changes:
      row["changes"] = {key: [old, new] for key, old, new in changes}
    with open(path, "a") as f:
      f.write(json.dumps({**row, **fields}) + "\n")
  return path


def read_config_history(workdir: str) -> list[dict]:
  """The rows of workdir/config_history.jsonl ([] if there is none); torn lines are skipped."""
  path = os.path.join(workdir, CONFIG_HISTORY)
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


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
  return {
    "state": ocp.StandardCheckpointHandler(),
    "data": ocp.JsonCheckpointHandler(),
    CHECKSUMS: ocp.JsonCheckpointHandler(),
  }


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


# ---- Checksums --------------------------------------------------------------------------


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (one per element; two for 64-bit dtypes)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """Two uint32 lanes: sum over elements i of mix(word_i ^ mix(i + seed)), mod 2**32.

  Integer sums are exact and order-free, so the checksum of an array does not depend on
  how it is sharded (it is computed where the array lives, on any mesh or host count), and
  any change of a single word changes it (mix is a bijection).
  """
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim) * jnp.uint32(stride)
    stride = (stride * words.shape[dim]) % 2**32
  lanes = []
  for seed in (0x9E3779B9, 0x7F4A7C15):
    lanes.append(jnp.sum(_mix32(words ^ _mix32(index + jnp.uint32(seed))), dtype=jnp.uint32))
  size = jnp.uint32(words.size % 2**32)
  return jnp.stack(lanes) ^ _mix32(jnp.stack([size, size ^ jnp.uint32(0x5BD1E995)]))


@jax.jit
def _digest(leaves: list) -> tuple[jax.Array, jax.Array]:
  """(checksums (n, 2) uint32, finite (n,) bool) of `leaves`; non-float leaves are finite."""
  sums = jnp.stack([_leaf_checksum(x) for x in leaves])
  finite = [
    jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True)
    for x in leaves
  ]
  return sums, jnp.stack(finite)


def _host(x: jax.Array) -> np.ndarray:
  """A replicated array's value (also when it spans processes)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def checksums(state: State) -> tuple[dict[str, str], list[str]]:
  """({"params/...": hex checksum} of every array of `state`, the paths of non-finite ones).

  Computed on the devices that hold `state` (all processes must call); the same for any
  sharding or device count.
  """
  with_path = jax.tree_util.tree_leaves_with_path(state)
  paths = [parallel.path_str(p) for p, _ in with_path]
  groups: dict[Any, list[int]] = {}  # One program per set of devices.
  for i, (_, x) in enumerate(with_path):
    devices = x.sharding.device_set if isinstance(x, jax.Array) else None
    groups.setdefault(frozenset(devices) if devices else None, []).append(i)
  record, nonfinite = {}, []
  for indices in groups.values():
    sums, finite = _digest([with_path[i][1] for i in indices])
    for i, (a, b), ok in zip(indices, _host(sums), _host(finite), strict=True):
      record[paths[i]] = f"{int(a):08x}{int(b):08x}"
      if not ok:
        nonfinite.append(paths[i])
  return record, sorted(nonfinite)


def _json_checksum(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _some(names: list[str], limit: int = 3) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def verify(state: State, record: dict | None, data: dict | None = None) -> str:
  """Checks a restored step: "verified" (checksums match) or "unverified" (none recorded).

  Raises CorruptCheckpoint naming the arrays whose checksums differ or whose values are not
  finite (params, EMA and optimizer state are always checked finite).
  """
  sums, nonfinite = checksums(state)
  problems = []
  if record is not None:
    if record.get("algorithm") != CHECKSUM_ALGORITHM:
      raise CorruptCheckpoint(f"unknown checksum algorithm {record.get('algorithm')!r}")
    saved = record.get("arrays", {})
    differ = [k for k in sorted(set(saved) & set(sums)) if saved[k] != sums[k]]
    if data is not None and record.get("data") not in (None, _json_checksum(data)):
      differ.append("data (the input iterator state)")
    if differ:
      problems.append(f"checksum mismatch in {len(differ)} item(s): {_some(differ)}")
    if saved and not set(saved) & set(sums):
      problems.append("no array matches the recorded checksums")
  if nonfinite:
    problems.append(f"non-finite values in {len(nonfinite)} array(s): {_some(nonfinite)}")
  if problems:
    raise CorruptCheckpoint("; ".join(problems))
  return "unverified" if record is None else "verified"


# ---- Saving -------------------------------------------------------------------------------


def save(
  mngr: ocp.CheckpointManager,
  state: State,
  data_state: dict,
  force: bool = False,
  metrics: dict | None = None,
) -> None:
  """Starts an async save of `state` (unstacked), the data iterator state and the checksums."""
  step = int(parallel.first_value(state["step"]))
  sums, nonfinite = checksums(state)
  if nonfinite:
    raise FloatingPointError(
      f"Refusing to save a non-finite checkpoint at step {step} ({_some(nonfinite)})."
    )
  record = {"algorithm": CHECKSUM_ALGORITHM, "arrays": sums, "data": _json_checksum(data_state)}
  mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      **{CHECKSUMS: ocp.args.JsonSave(record)},
    ),
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


def _saved_tree(mngr, step: int):
  """The state item's metadata tree of `step` (ArrayMetadata leaves)."""
  saved = mngr.item_metadata(step)["state"]
  return getattr(saved, "tree", saved)


def _check_compatible(mngr, step: int, abstract_state: State) -> None:
  """Raises `UserError` naming the parameters whose saved shapes differ from the config's."""
  try:
    saved = _saved_tree(mngr, step)["params"]
  except Exception:  # Unreadable metadata: the restore reports it.
    return
  diffs = shape_diffs(_shapes(saved), _shapes(abstract_state["params"]))
  if diffs:
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    raise UserError(
      f"The checkpoint at step {step} in {mngr.directory} was written for a different model "
      f"(params: {shown}); use a new --workdir or the matching config.model."
    )


def _on_first_device(tree):
  """ShapeDtypeStructs of `tree`'s arrays on this process's first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda x: (
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device)
      if hasattr(x, "shape") and hasattr(x, "dtype")
      else x
    ),
    tree,
  )


def _as_saved(mngr, step: int):
  """The abstract state of `step` as it was saved (shapes and dtypes), on the first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=device),
    _saved_tree(mngr, step),
  )


def _has_checksums(mngr, step: int) -> bool:
  return (epath.Path(mngr.directory) / str(step) / CHECKSUMS).exists()


def _restore_verified(mngr, step: int, abstract_state) -> tuple[State, dict, str]:
  """(state, data state, "verified" | "unverified") of `step`, restored onto
  `abstract_state` (None: as saved, on the first device); raises if it is damaged."""
  if abstract_state is None:
    abstract_state = _as_saved(mngr, step)
  items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
  verified = _has_checksums(mngr, step)
  if verified:
    items[CHECKSUMS] = ocp.args.JsonRestore()
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  record = restored[CHECKSUMS] if verified else None
  status = verify(restored["state"], record, restored["data"])
  return restored["state"], restored["data"], status


def _reason(error: Exception) -> str:
  """What is wrong with a step, in a few words: "failed verification: ..." or "is unreadable
  (...)" with the array TensorStore could not read, where it says."""
  if isinstance(error, CorruptCheckpoint):
    return f"failed verification: {error}"
  text = " ".join(str(error).split())
  array = re.search(r"'path': '([^'/][^']*)/'", text)  # TensorStore's spec of the array.
  text = text.split(" See full TensorStore details")[0][:240]
  if array:
    text = f"array {array.group(1).replace('.', '/')}: {text}"
  return f"is unreadable ({type(error).__name__}: {text})"


def _warn(message: str) -> None:
  """One line on stderr, from process 0."""
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def move_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> list[str]:
  """Moves checkpoint `steps` to ckpt/corrupt/<step>-<time>/ (process 0; nothing deleted).

  The manager is reloaded, so it forgets them: the next save of such a step happens. Returns
  the new paths. Every process must call it.
  """
  directory = epath.Path(mngr.directory)
  moved = []
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for step in steps:
    target = directory / CORRUPT / f"{step}-{stamp}"
    if jax.process_index() == 0:
      (directory / CORRUPT).mkdir(parents=True, exist_ok=True)
      n = 1
      while target.exists():
        target, n = directory / CORRUPT / f"{step}-{stamp}-{n}", n + 1
      (directory / str(step)).rename(target)
      _warn(f"moved the damaged checkpoint {directory / str(step)} to {target}.")
    moved.append(str(target))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("dit.checkpoint.move_aside")
  mngr.reload()
  return moved


def _newest_readable(
  mngr, restore_step: Callable[[int], Any], move_bad: bool = False
) -> tuple[Any, list[str]]:
  """restore_step(step) of the newest step that reads and verifies, with a warning for each
  newer one that does not (moved aside, with `move_bad`, once an older step restored).

  Returns (restored or None if there are no steps, the errors of the skipped steps); raises
  UserError if there are steps but none restores (then nothing is moved).
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  errors, bad = [], []
  for step in steps:
    try:
      restored = restore_step(step)
    except UserError:
      raise
    except Exception as e:  # Orbax raises many types for a damaged checkpoint.
      errors.append(f"step {step} {_reason(e)}")
      bad.append(step)
      _warn(
        f"checkpoint step {step} in {mngr.directory} {_reason(e)}; falling back to the "
        "previous one."
      )
      continue
    if bad and move_bad:
      move_aside(mngr, bad)
    return restored, errors
  if steps:
    raise UserError(
      f"No checkpoint in {mngr.directory} is readable ({'; '.join(errors)}). Move the "
      "directory away to start afresh."
    )
  return None, errors


def restore(
  mngr: ocp.CheckpointManager, abstract_state: State, move_bad: bool = True
) -> tuple[State, dict] | None:
  """Restores the newest readable, verified checkpoint onto the shardings of `abstract_state`.

  Returns (state, data iterator state), or None if there is no checkpoint. Leaves without a
  sharding go to the first local device; Orbax reshards, so the checkpoint may come from any
  device count or mesh. A step whose params do not fit `abstract_state` is a UserError.
  move_bad: move the newer steps that failed aside (`move_aside`), so that training saves
  them again; every process must call it then.
  """
  abstract_state = _on_first_device(abstract_state)

  def restore_step(step):
    _check_compatible(mngr, step, abstract_state)
    state, data, _ = _restore_verified(mngr, step, abstract_state)
    return state, data

  restored, _ = _newest_readable(mngr, restore_step, move_bad=move_bad)
  return restored


def restore_params(
  workdir: str, abstract_params: dict, use_ema: bool = True, step: int | None = None
) -> dict:
  """The EMA (or raw) params of the newest readable, verified checkpoint in `workdir/ckpt`
  (of `step`, if given: then a damaged step is an error, not skipped).

  Restored as saved (no optimizer needed, so converted checkpoints of models dit.train cannot
  initialise load too), verified like `restore` (a damaged step is skipped with a warning,
  and left in place), then checked against and cast to `abstract_params`
  (jax.ShapeDtypeStruct leaves): a mismatch is a UserError listing the differences.
  """
  ckpt_dir = os.path.join(os.path.abspath(workdir), "ckpt")
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"No checkpoints in {workdir!r} (expected {ckpt_dir}); train first.")
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers=_handlers())
  if step is not None and step not in mngr.all_steps():
    raise UserError(f"{ckpt_dir} has no step {step} (it has {sorted(mngr.all_steps())}).")
  try:
    if step is None:
      state, _ = _newest_readable(mngr, lambda n: _restore_verified(mngr, n, None)[0])
    else:
      state = _restore_verified(mngr, step, None)[0]
  except UserError as e:
    raise UserError(f"No readable checkpoint in {ckpt_dir} ({e}).") from e
  except Exception as e:  # Orbax raises many types for a damaged step.
    raise UserError(f"Checkpoint step {step} in {ckpt_dir} {_reason(e)}.") from e
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


# ---- python -m dit.checkpoint verify WORKDIR ----------------------------------------------


def _step_status(mngr, step: int) -> dict:
  try:
    _, _, status = _restore_verified(mngr, step, None)
  except Exception as e:  # Whatever a damaged step raises.
    return {"step": step, "status": "corrupt", "detail": _reason(e)}
  detail = "checksums match" if status == "verified" else "no checksums: written before them"
  return {"step": step, "status": status, "detail": detail}


def verify_workdir(workdir: str, move_bad: bool = False) -> list[dict]:
  """The status of every checkpoint in workdir/ckpt and workdir/ckpt_best.

  Returns [{"dir", "step", "status", "detail"}]: status "verified", "unverified" (no
  checksums: written before them; readable and finite), "corrupt" (the detail says what
  failed) or "moved aside" (an entry of <dir>/corrupt/). move_bad: move the corrupt steps
  aside as a resuming dit.train would (process 0 moves; every process must call).
  """
  rows = []
  for name in ("ckpt", "ckpt_best"):
    directory = os.path.join(os.path.abspath(workdir), name)
    if not os.path.isdir(directory):
      continue
    corrupt_dir = os.path.join(directory, CORRUPT)
    earlier = sorted(os.listdir(corrupt_dir)) if os.path.isdir(corrupt_dir) else []
    mngr = ocp.CheckpointManager(directory, item_handlers=_handlers())
    steps = [dict(_step_status(mngr, step), dir=name) for step in mngr.all_steps()]
    bad = [row for row in steps if row["status"] == "corrupt"]
    if bad and move_bad:
      for row, path in zip(bad, move_aside(mngr, [r["step"] for r in bad]), strict=True):
        row["detail"] += f"; moved to {path}"
    rows += steps + [
      {"dir": f"{name}/{CORRUPT}", "step": entry, "status": "moved aside", "detail": "kept"}
      for entry in earlier
    ]
  return rows


def main(argv: list[str]) -> None:
  from absl import flags, logging

  logging.set_verbosity(logging.ERROR)  # Orbax warns about every damaged item; we report.
  if len(argv) != 3 or argv[1] != "verify":
    raise UserError("usage: python -m dit.checkpoint verify WORKDIR [--move_aside]")
  workdir = argv[2]
  if not os.path.isdir(os.path.join(workdir, "ckpt")):
    raise UserError(f"No checkpoints in {workdir!r} (expected {workdir}/ckpt).")
  rows = verify_workdir(workdir, move_bad=flags.FLAGS.move_aside)
  for row in rows:
    print(f"{row['dir']}/{row['step']}: {row['status']} ({row['detail']})")
  corrupt = [r for r in rows if r["status"] == "corrupt"]
  print(f"{len(rows)} entries, {len(corrupt)} corrupt.")
  if corrupt:
    sys.exit(1)


def cli() -> None:
  from absl import flags

  from dit.cli import run_command

  flags.DEFINE_bool("move_aside", False, "Move corrupt steps to ckpt/corrupt/ (as dit.train).")
  run_command(main)


if __name__ == "__main__":
  cli()
