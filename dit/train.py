"""The train loop: one file, read top to bottom.

  dit-train --config=configs/digits.py --workdir=runs/digits [--config.key=value]
  dit-train --workdir=runs/digits [--config.total_steps=4000]   # resume with its config.json
  dit-train --config=configs/digits.py --workdir=runs/tuned --init_from=runs/digits  # fine-tune

Sections: config checks and workdir -> model state -> the update step -> setup (devices and
mesh, model, optimizer, objective, shardings, the jitted or pmapped step; shared with
benchmarks/train.py) -> logging -> the loop (restore, step, log, sample, evaluate, save).

The objective (dit/objectives/: diffusion, or consistency distillation with a `distill`
section) is chosen once by `setup`; the update step only calls its loss.

Randomness: every example's draws come from `fold_in(fold_in(seed_key, step),
global_example_index)`, so a run is the same on any number of devices, hosts or
micro-batches (up to float summation order) and bit-identical when rerun on the same
devices; a resumed run continues the exact same stream.

Parallelism (config.parallelism):
- "pmap": `jax.pmap` data parallelism; the state is replicated (a leading device axis),
  gradients are averaged with `lax.pmean`.
- "mesh": `jax.jit` over a ("data", "fsdp", "tensor") mesh (config.mesh); parameters and
  optimizer state are sharded by dit.parallel's rules, the batch over data x fsdp.
The two differ only in how the one update function is wrapped and how arrays are placed.
Both save the same checkpoint layout (dit/checkpoint.py: unstacked, unsharded shapes), so a
checkpoint restores onto any device count, mesh or path.

Failure handling: a non-finite loss or gradient skips the update (counted); more than
config.max_bad_steps consecutive ones stop the run (FloatingPointError; exit 3 from the
command, naming the last checkpoint). SIGTERM saves a checkpoint at the next step boundary
and exits with 143. A checkpoint that cannot be read or fails verification (checksums,
non-finite values) is skipped for the previous one with a warning, and moved aside to
ckpt/corrupt/ so that its step is saved again (dit/checkpoint.py). Nothing is written to the
workdir before the config, the devices and the data have been accepted; the first metrics
row after a restart mid-window is marked "partial_window".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging

from dit import checkpoint, distill, evaluation, generate, hardware, mup, objectives, parallel
from dit import cli as cli_lib
from dit.checkpoint import State
from dit.cli import UserError, run_command
from dit.data import pipeline
from dit.diffusion import flow, schedules
from dit.models import dit as dit_model
from dit.models import flops, repeat
from dit.optim import make_optimizer

# Policies of `jax.checkpoint` that take no arguments (config.step_remat_policy).
REMAT_POLICIES = (
  "everything_saveable",
  "nothing_saveable",
  "dots_saveable",
  "checkpoint_dots",
  "dots_with_no_batch_dims_saveable",
  "checkpoint_dots_with_no_batch_dims",
)


# ---- Config checks and workdir -------------------------------------------------


def check_config(config: ml_collections.ConfigDict, num_data_parallel: int) -> None:
  """Raises `UserError` for settings that cannot work, naming the value."""
  for name in ("batch_size", "total_steps", "log_every", "ckpt_every", "keep_ckpts"):
    if config[name] <= 0:
      raise UserError(f"config.{name} must be positive, got {config[name]}.")
  if config.parallelism not in ("pmap", "mesh"):
    raise UserError(f"config.parallelism must be 'pmap' or 'mesh', got {config.parallelism!r}.")
  per_step = num_data_parallel * config.grad_accum_steps
  if config.grad_accum_steps < 1 or config.batch_size % per_step:
    raise UserError(
      f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
      f"({num_data_parallel} devices) x config.grad_accum_steps ({config.grad_accum_steps})."
    )
  policy = config.get("step_remat_policy", "")
  if policy and policy not in REMAT_POLICIES:
    raise UserError(
      f"config.step_remat_policy must be '' or one of {REMAT_POLICIES}, got {policy!r}."
    )
  if distill.enabled(config):
    distill.check_config(config)
  if flow.is_flow(config):
    try:
      flow.from_config(config)
    except ValueError as e:
      raise UserError(f"Bad config.flow: {e}") from e
  generate.check_sample_config(config)  # Now, not at the first grid or evaluation.
  if config.sample.num:
    generate.sampler_settings(config)
  if eval_every(config):
    evaluation.check_eval_config(config)  # Now, not after the first eval.every steps.
    if config.eval.best_mode not in ("min", "max"):
      raise UserError(
        f"config.eval.best_mode must be 'min' or 'max', got {config.eval.best_mode!r}."
      )


def eval_every(config: ml_collections.ConfigDict) -> int:
  """config.eval.every, 0 (no evaluation during training) for configs without an eval section."""
  return config.eval.every if "eval" in config else 0


# Sections whose change makes an old checkpoint meaningless for this run.
_RESUME_SECTIONS = ("model", "diffusion", "flow", "data", "seed", "batch_size", "distill")


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> list[tuple]:
  """A restarted run must match the saved config in the fields that shape the state (how the
  model computes, checkpoint.COMPUTE_ONLY_KEYS, may change); returns the other changes,
  [(dotted key, old, new)] (optimizer, logging, sampling, remat, ...)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    old = json.load(f)
  new = json.loads(config.to_json_best_effort())
  diffs = [
    f"{key}: checkpoint has {a!r}, config has {b!r}"
    for key, a, b in checkpoint.config_changes(
      old, new, _RESUME_SECTIONS, ignore=checkpoint.COMPUTE_ONLY_KEYS
    )
  ]
  diffs += mup.resume_conflicts(old, config)  # Its optimizer state has another layout.
  if diffs:
    raise UserError(
      f"{workdir} holds a run with an incompatible config; use a new --workdir or the "
      "same settings. Differing fields: " + "; ".join(diffs)
    )
  return checkpoint.config_changes(old, new)


# ---- Model state ----------------------------------------------------------------------


def model_input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  m = config.model
  return (m.input_size, m.input_size, m.in_channels)


def init_state(
  config: ml_collections.ConfigDict,
  model,
  tx,
  objective: objectives.Objective | None = None,
  frozen: dict | None = None,
) -> State:
  """The whole training state as a pytree: what a checkpoint holds (float32 params).

  objective, frozen: an objective whose `init_params` makes the initial params from its
  frozen inputs (a distillation student starts as its teacher).
  """
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  params = model.init(init_key, *dit_model.example_inputs(model))["params"]
  if mup.enabled(config):  # Rescales the fresh init by width (dit/mup.py).
    params = mup.init_params(config, params, init_key)
  if objective is not None and objective.init_params is not None:
    params = objective.init_params(params, frozen)
  return checkpoint.new_state(params, tx, train_key)


def abstract_state(config: ml_collections.ConfigDict) -> State:
  """The training state's shapes and dtypes for `config` (nothing is allocated)."""
  model = dit_model.build_model(config.model)
  tx, _ = make_optimizer(config)
  return jax.eval_shape(functools.partial(init_state, config, model, tx))


def restore_state(config: ml_collections.ConfigDict, workdir: str) -> tuple[State, dict] | None:
  """(state, data iterator state) of the newest readable checkpoint of a run (on the first
  device, unsharded), or None if it has none: for inspecting a run from Python (a damaged
  step is skipped with a warning and left in place)."""
  mngr = checkpoint.manager(workdir, config)
  return checkpoint.restore(mngr, abstract_state(config), move_bad=False)


# ---- The update step -----------------------------------------------------------------


def make_apply(model, remat_policy: str = "", intermediates: bool = False) -> objectives.base.Apply:
  """apply(params, x_t, t, cond) -> model output, or (output, the intermediates the model
  sows) with `intermediates` (REPA's projection); with a policy, the forward is recomputed in
  the backward pass, keeping what the policy saves (config.step_remat_policy)."""

  def apply(params, x_t, t, cond):
    if intermediates:
      out, state = model.apply({"params": params}, x_t, t, cond, mutable=["intermediates"])
      return out, state["intermediates"]
    return model.apply({"params": params}, x_t, t, cond)

  if remat_policy:
    apply = jax.checkpoint(apply, policy=getattr(jax.checkpoint_policies, remat_policy))
  return apply


def _grads(loss_fn, params, micro: dict, k: int):
  """((loss, metrics), grads) of `loss_fn(params, micro)`, over k micro-batches if k > 1."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    return grad_fn(params, micro)
  # Micro-batch j takes examples j, j + k, ...: a strided split keeps every micro-batch
  # spread over all data-parallel devices (a contiguous one would sit on a few).
  micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), micro)

  def accumulate(carry, mb):
    return jax.tree.map(jnp.add, carry, grad_fn(params, mb)), None

  zeros = jax.tree.map(
    jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
  )
  total, _ = jax.lax.scan(accumulate, zeros, micro)
  return jax.tree.map(lambda x: x / k, total)


def _global_norm(tree) -> jax.Array:
  """optax.global_norm, leaf by leaf: each leaf's squares wait for the sum so far (0 * it is
  added), so XLA keeps one leaf's squares live instead of every leaf's (stacked block params:
  a whole param-sized copy). A non-finite sum makes every later term NaN: still non-finite."""
  total = jnp.zeros((), jnp.float32)
  for x in reversed(jax.tree.leaves(tree)):
    x = x + (0 * total).astype(x.dtype)
    total = total + jnp.sum(jnp.square(x)).astype(jnp.float32)
  return jnp.sqrt(total)


def make_update_fn(
  config: ml_collections.ConfigDict,
  loss: objectives.base.Loss,
  tx: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
  axis_name: str | None,
):
  """Returns `update(state, batch, frozen) -> (state, metrics)`, pure and jittable.

  loss: the objective's loss (`objectives.Objective.loss`); frozen: its frozen inputs. With
  `axis_name` it runs inside pmap: the batch is this device's slice, gradients and metrics
  are averaged over the axis. Mixed precision is the model's compute dtype
  (config.model.dtype): params, gradients, optimizer state and EMA stay float32.
  """
  o = config.optim

  def example_keys(state, num):
    offset = jax.lax.axis_index(axis_name) * num if axis_name else 0
    step_key = jax.random.fold_in(state["rng"], state["step"])
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(offset + jnp.arange(num))

  def update(state, batch, frozen=None):
    x0 = batch["latent"] if "latent" in batch else batch["image"]
    micro = dict(objectives.batch_cond(batch), x0=x0, keys=example_keys(state, x0.shape[0]))
    micro.update({k: batch[k] for k in objectives.repa.BATCH_KEYS if k in batch})
    frozen = dict(frozen or {}, ema_params=state["ema_params"])
    loss_fn = lambda params, mb: loss(params, mb, frozen)
    (loss_value, aux), grads = _grads(loss_fn, state["params"], micro, config.grad_accum_steps)
    if axis_name:
      loss_value, aux, grads = jax.lax.pmean((loss_value, aux, grads), axis_name)

    grad_norm = _global_norm(grads)
    step = state["step"]
    decay = o.ema_decay
    if o.ema_warmup:
      decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))

    def apply(old):
      """params, opt_state, ema_params after this step's update."""
      updates, opt_state = tx.update(grads, old["opt_state"], old["params"])
      params = optax.apply_updates(old["params"], updates)
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, old["ema_params"], params)
      return {"params": params, "opt_state": opt_state, "ema_params": ema}

    # NaN/Inf guard: a bad step changes nothing but the counters, so a checkpoint never
    # holds non-finite values. Decided before the update, which then runs under lax.cond:
    # a select of new against old (jnp.where) kept both alive and cost 4 param-sized
    # temporaries; the taken branch updates the donated buffers in place. The updates are
    # checked with per-leaf `all` reductions, which XLA fuses with the update's arithmetic
    # (a global norm of them would be materialised).
    ok = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
    updates, _ = tx.update(grads, state["opt_state"], state["params"])  # For the check only.
    ok = ok & jnp.stack([jnp.isfinite(u).all() for u in jax.tree.leaves(updates)]).all()
    trained = {k: state[k] for k in ("params", "opt_state", "ema_params")}
    trained = jax.lax.cond(ok, apply, lambda old: old, trained)
    new_state = {
      "step": step + 1,
      **trained,
      "rng": state["rng"],
      "bad_steps": jnp.where(ok, 0, state["bad_steps"] + 1),
      "skipped_steps": state["skipped_steps"] + (~ok).astype(jnp.int32),
    }
    metrics = {
      "loss": loss_value,
      "grad_norm": grad_norm,
      "lr": lr_schedule(step),
      "bad_steps": new_state["bad_steps"],
      "skipped_steps": new_state["skipped_steps"],
      **aux,
    }
    return new_state, metrics

  return update


# ---- Setup (shared with benchmarks/train.py) ---------------------------------------------


@dataclasses.dataclass
class Setup:
  """Everything the loop (and a benchmark) needs before the first step; nothing is allocated
  but the objective's frozen inputs.

  step: the jitted (mesh) or pmapped update, `step(state, batch, frozen)`, state donated.
  abstract_state, state_sharding: the step's state (no device axis). With config.model.scan
  its params, EMA and optimizer moments hold each block stack in the stacked layout
  (`stacks`, dit/models/repeat.py): the scanned model scans them as they are, so the traced
  step does not grow with depth. checkpoint_state: the same state as checkpoints hold it
  (per-block params blocks_{i}, whichever way the model runs), with its shardings.
  init: () -> the initial state in the step's layout, placed on `state_sharding`.
  place_state: the step's state -> the step's input (a device axis for pmap); host_state:
  back, to the checkpoint layout (what save, sampling and evaluation take).
  from_checkpoint: the checkpoint layout -> the step's (a restored state).
  to_device: a host batch -> the step's batch layout. frozen: the objective's frozen inputs,
  placed for the step.
  """

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  use_pmap: bool
  model: Any
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  schedule: schedules.Schedule | None  # None for flow matching.
  objective: objectives.Objective
  abstract_state: State
  state_sharding: Any
  step: Callable
  init: Callable[[], State]
  to_device: Callable[[dict], dict]
  frozen: dict
  checkpoint_state: State
  stacks: tuple[repeat.Stack, ...] = ()  # Stacked in the step's state; () without scan.
  _relayouts: dict = dataclasses.field(default_factory=dict, repr=False)

  def place_state(self, state: State) -> State:
    return parallel.stack_for_pmap(state, self.mesh) if self.use_pmap else state

  def host_state(self, state: State) -> State:
    state = parallel.unstack_from_pmap(state, self.mesh) if self.use_pmap else state
    return self._relayout("checkpoint", None)(state)

  def from_checkpoint(self, tree: Any, key: str | None = None) -> Any:
    """A state in the checkpoint layout (or its `key` entry, "params") -> the step's layout,
    on state_sharding."""
    return self._relayout("step", key)(tree)

  def _relayout(self, to: str, key: str | None) -> Callable:
    if not self.stacks:
      return lambda tree: tree
    if (to, key) not in self._relayouts:
      target = self.abstract_state if to == "step" else self.checkpoint_state
      target = target if key is None else target[key]
      convert = repeat.stack_tree if to == "step" else repeat.unstack_tree
      self._relayouts[to, key] = jax.jit(
        lambda tree: convert(tree, self.stacks),
        out_shardings=jax.tree.map(lambda a: a.sharding, target),
      )
    return self._relayouts[to, key]


def make_mesh(config: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh, int]:
  """(the mesh of config.parallelism, its data-parallel size); bad settings are a UserError."""
  use_pmap = config.parallelism == "pmap"
  try:
    mesh = parallel.pmap_mesh() if use_pmap else parallel.make_mesh(config.mesh)
  except ValueError as e:
    raise UserError(str(e)) from e
  num_dp = jax.device_count() if use_pmap else parallel.data_parallel_size(mesh)
  return mesh, num_dp


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Builds the mesh, model, optimizer, schedule, objective, shardings and the update step."""
  mesh, num_dp = make_mesh(config)
  check_config(config, num_dp)
  use_pmap = config.parallelism == "pmap"
  model = dit_model.build_model(config.model)
  tx, lr_schedule = make_optimizer(config)
  schedule = None if flow.is_flow(config) else schedules.from_config(config.diffusion)
  apply = make_apply(model, config.get("step_remat_policy", ""), objectives.repa.enabled(config))
  objective = objectives.make_objective(config, apply, schedule)
  init_fn = functools.partial(init_state, config, model, tx, objective)
  saved_state = jax.eval_shape(init_fn, objective.frozen)  # The checkpoint layout.
  # Scanned, the step's state keeps the block stacks stacked (see Setup).
  stacks = ()
  if config.model.get("scan", False):
    stacks = repeat.find_stacks(model, *dit_model.example_inputs(model))

  # Shardings of the (unstacked) state and the frozen inputs: replicated for pmap, by the
  # rules on the mesh; a stacked leaf is sharded as each of its blocks, whole over depth.
  replicated = parallel.replicated(mesh)
  if use_pmap:
    saved_sharding = jax.tree.map(lambda _: replicated, saved_state)
    frozen_sharding = jax.tree.map(lambda _: replicated, objective.frozen)
  else:
    fsdp_min = config.mesh.get("fsdp_min_size", 2**14)
    saved_sharding = parallel.state_sharding(saved_state, mesh, min_fsdp_size=fsdp_min)
    frozen_sharding = parallel.state_sharding(objective.frozen, mesh, min_fsdp_size=fsdp_min)
  with_depth = lambda blocks: jax.NamedSharding(mesh, jax.P(None, *blocks[0].spec))
  state_sharding = repeat.stack_tree(saved_sharding, stacks, stack=with_depth)
  placed = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  checkpoint_state = jax.tree.map(placed, saved_state, saved_sharding)
  abstract_state = jax.eval_shape(lambda s: repeat.stack_tree(s, stacks), saved_state)
  abstract_state = jax.tree.map(placed, abstract_state, state_sharding)

  update = make_update_fn(config, objective.loss, tx, lr_schedule, "batch" if use_pmap else None)
  if use_pmap:
    step = jax.pmap(update, axis_name="batch", donate_argnums=(0,))
    to_device = functools.partial(parallel.pmap_batch, mesh=mesh)
  else:
    batch_sharding = parallel.batch_sharding(mesh)
    step = jax.jit(
      update,
      in_shardings=(state_sharding, batch_sharding, frozen_sharding),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,),
    )
    to_device = functools.partial(parallel.global_batch, sharding=batch_sharding)
  frozen = jax.device_put(objective.frozen, frozen_sharding)
  init = jax.jit(lambda f: repeat.stack_tree(init_fn(f), stacks), out_shardings=state_sharding)
  return Setup(
    config=config,
    mesh=mesh,
    use_pmap=use_pmap,
    model=model,
    tx=tx,
    lr_schedule=lr_schedule,
    schedule=schedule,
    objective=objective,
    abstract_state=abstract_state,
    state_sharding=state_sharding,
    step=step,
    init=lambda: init(frozen),
    to_device=to_device,
    frozen=parallel.stack_for_pmap(frozen, mesh) if use_pmap else frozen,
    checkpoint_state=checkpoint_state,
    stacks=stacks,
  )


# ---- Logging ----------------------------------------------------------------------------


class MetricWriter:
  """metrics.jsonl + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      _rewind_jsonl(path, resume_step)
    from tensorboardX import SummaryWriter

    self.jsonl = open(path, "a")
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.active:
      return
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self.jsonl.flush()
    for k, v in metrics.items():
      if np.isfinite(v):  # NaN losses stay in metrics.jsonl (tensorboardX warns on each).
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    """An (H, W, 3) uint8 image, e.g. a sample grid, to TensorBoard."""
    if self.active:
      self.tb.add_image(tag, image, step, dataformats="HWC")
      self.tb.flush()

  def close(self) -> None:
    if self.active:
      self.jsonl.close()
      self.tb.close()


def _rewind_jsonl(path: str, step: int) -> None:
  """Drops rows after `step` (logged before a crash, to be redone) and a torn last line."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if row.get("step", 0) <= step:
        rows.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(rows)
  os.replace(tmp, path)


def _summarise(window: list[dict], elapsed: float, config, flops_per_image: float | None) -> dict:
  """Host floats for one log row from the per-step metrics since the last row; `elapsed`:
  the seconds the window's steps took to run (`Throughput.window`)."""
  steps = [{k: float(parallel.first_value(v)) for k, v in m.items()} for m in window]
  row = {
    "loss": float(np.mean([s["loss"] for s in steps])),
    "grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
    "lr": steps[-1]["lr"],
    "bad_steps": max(s["bad_steps"] for s in steps),  # Longest non-finite streak seen.
    "skipped_steps": steps[-1]["skipped_steps"],
    "steps_per_sec": len(steps) / elapsed,
  }
  for key in steps[0].keys() - row.keys():  # The objective's own metrics (e.g. repa_align).
    row[key] = float(np.mean([s[key] for s in steps]))
  row["img_per_sec"] = row["steps_per_sec"] * config.batch_size
  if flops_per_image:
    # Model FLOPs (forward + backward, no rematerialisation) per device per second.
    row["tflops_per_device"] = flops_per_image * row["img_per_sec"] / jax.device_count() / 1e12
    peak = hardware.peak_tflops()
    if peak:
      row["mfu"] = row["tflops_per_device"] / peak
  row.update(hardware.memory_in_use())
  return row


def _train_flops_per_image(model) -> float | None:
  try:
    return flops.model_info(model)["gflops_train"] * 1e9
  except Exception as e:  # Best effort: logging must not stop training.
    logging.warning("Could not count model FLOPs: %s", e)
    return None


def _print_run_summary(config, workdir: str, mesh) -> None:
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  print(f"dit.train: workdir {workdir}")
  print(
    f"devices: {len(devices)} ({', '.join(kinds)}, platform {devices[0].platform}), "
    f"{jax.local_device_count()} local, {jax.process_count()} process(es); "
    f"parallelism {config.parallelism}, mesh {dict(mesh.shape)}"
  )
  print(f"config:\n{config}", flush=True)


# ---- The loop ------------------------------------------------------------------------------


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, init_from: str | None = None
) -> State:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the state.

  init_from: fine-tuning: a workdir (or its ckpt/, or ckpt/<step>) whose EMA params start a
  new run here (step 0, a fresh optimizer); their shapes must fit config.model. Rerunning
  the same command resumes the fine-tuning run.
  The returned state is unstacked (no device axis) and in the checkpoint layout (per-block
  params): replicated for "pmap", sharded over the mesh for "mesh". Nothing is written to
  `workdir` before the config, the devices, the data (and init_from's params) have been
  accepted; config changes on resume are recorded in config_history.jsonl.
  """
  if config.distributed:
    parallel.initialize_distributed()
  workdir = checkpoint.check_workdir(workdir)
  changes = check_resume_config(workdir, config)
  source = init_source(workdir, init_from)
  s = setup(config)
  init_params = _init_params(s, source) if source else None
  data_iter = make_data_iterator(config)
  workdir = checkpoint.prepare_workdir(workdir)
  if jax.process_index() == 0:
    checkpoint.write_config(workdir, config)
    _print_run_summary(config, workdir, s.mesh)

  mngr = checkpoint.manager(workdir, config)
  best_mngr = checkpoint.manager(workdir, config, best=True) if eval_every(config) else None
  state, step = _start_state(s, mngr, data_iter, init_params)
  _record_start(workdir, step, changes, init_from if source else None)
  try:
    state = _loop(s, s.place_state(state), data_iter, workdir, mngr, best_mngr)
  except pipeline.LabelError as e:  # Found in a batch (sources that cannot list labels).
    raise UserError(f"config.data: {str(e).rstrip('.')}.") from e
  finally:
    mngr.wait_until_finished()
    if best_mngr is not None:
      best_mngr.wait_until_finished()
  if config.sample.num:
    params = _eval_params(s, state)
    if jax.process_index() == 0:
      _write_samples(s, params, workdir, "grid.png")
  return state


def _has_checkpoints(workdir: str) -> bool:
  ckpt = os.path.join(workdir, "ckpt")
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def init_source(workdir: str, init_from: str | None) -> tuple[str, int | None] | None:
  """(workdir, step or None for the newest) that --init_from names, None when there is
  nothing to load: no --init_from, or `workdir` holds the run it started (then it resumes)."""
  if init_from is None:
    return None
  path = os.path.abspath(init_from)
  if _has_checkpoints(workdir):
    if any(row.get("init_from") == path for row in checkpoint.read_config_history(workdir)):
      return None  # The fine-tuning run this command started: resume it.
    raise UserError(
      f"--init_from starts a new run, but {workdir} already holds checkpoints; resume it "
      "without --init_from or use a new --workdir."
    )
  parent, name = os.path.split(path)
  if os.path.isdir(os.path.join(path, "ckpt")):
    return path, None
  if name == "ckpt" and os.path.isdir(path):
    return parent, None
  if name.isdigit() and os.path.basename(parent) == "ckpt" and os.path.isdir(path):
    return os.path.dirname(parent), int(name)
  raise UserError(
    f"--init_from={init_from!r} is not a workdir with checkpoints (no {path}/ckpt), its ckpt/ "
    "directory or a ckpt/<step> directory."
  )


def _init_params(s: Setup, source: tuple[str, int | None]):
  """The EMA params of --init_from's checkpoint, checked against config.model, placed in the
  step's layout."""
  workdir, step = source
  try:
    params = checkpoint.restore_params(workdir, s.checkpoint_state["params"], step=step)
  except UserError as e:
    raise UserError(f"--init_from: {e}") from e
  params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, s.checkpoint_state["params"]))
  return s.from_checkpoint(params, "params")


def _start_state(s: Setup, mngr, data_iter, init_params) -> tuple[State, int | None]:
  """(the state to train from, the restored step or None for a new run)."""
  restored = checkpoint.restore(mngr, s.checkpoint_state)
  if restored is not None:
    state, data_state = restored
    state = s.from_checkpoint(state)
    data_iter.set_state(data_state)
    step = int(parallel.first_value(state["step"]))
    if jax.process_index() == 0:
      print(f"Resumed from step {step}.", flush=True)
    return state, step
  state = s.init()
  if init_params is not None:  # A fresh optimizer state fits any params of these shapes.
    ema = jax.tree.map(lambda x: x.copy(), init_params)  # Two buffers: both are donated.
    state = dict(state, params=init_params, ema_params=ema)
  return state, None


def _record_start(workdir: str, step: int | None, changes: list, init_from: str | None) -> None:
  """Appends config changes (on resume) and a new run's --init_from to config_history.jsonl,
  and says so on the console."""
  if init_from is not None:
    init_from = os.path.abspath(init_from)
    path = checkpoint.record_config_history(workdir, 0, changes, init_from=init_from)
    if jax.process_index() == 0:
      print(f"Fine-tuning: step 0 holds the EMA params of {init_from} (recorded in {path}).")
  elif changes:
    path = checkpoint.record_config_history(workdir, step or 0, changes)
    if jax.process_index() == 0:
      print(
        f"Config changes from {workdir}/config.json at step {step or 0} (recorded in {path}): "
        + checkpoint.describe_changes(changes),
        flush=True,
      )


def make_data_iterator(config: ml_collections.ConfigDict) -> pipeline.TrainIterator:
  """This process's rows of every global batch; a bad config.data (or a label outside
  [0, config.model.num_classes)) is a UserError."""
  try:
    return pipeline.make_train_iterator(
      config.data,
      global_batch_size=config.batch_size,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_classes=config.model.num_classes or None,
      size_multiple=config.model.get("patch_size", 1),  # Aspect-ratio buckets' sides.
    )
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f"config.data: {str(e).rstrip('.')}.") from e


def _eval_params(s: Setup, unstacked: State):
  """Params for sampling on this process's first device (all processes must call)."""
  params = unstacked["ema_params"] if s.config.sample.use_ema else unstacked["params"]
  return parallel.local_copy(parallel.gather(params, s.mesh))


class _Preemption:
  """SIGTERM asks for a checkpoint at the next step boundary, then an exit. On multi-host jobs
  JAX's preemption service agrees on that step across hosts."""

  def __init__(self):
    self.requested = False
    self.multi_host = jax.process_count() > 1
    self.previous = None
    if not self.multi_host:
      self.previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))

  def now(self, mngr, step: int) -> bool:
    return self.requested or (self.multi_host and mngr.reached_preemption(step))

  def close(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def _loop(s: Setup, state: State, data_iter, workdir: str, mngr, best_mngr) -> State:
  """Steps from the state's step to config.total_steps; returns the unstacked state."""
  config, is_main = s.config, jax.process_index() == 0
  start_step = int(parallel.first_value(state["step"]))
  # Rows after the restored step (logged before a crash) are dropped: they are redone.
  writer = MetricWriter(workdir, resume_step=start_step)
  flops_per_image = _train_flops_per_image(s.model) if is_main else None
  progress, clock = None, Throughput()
  preemption = _Preemption()
  compiled, window = {}, []  # One program per batch shape (aspect-ratio buckets: per bucket).
  step, data_state = start_step, data_iter.get_state()
  try:
    while step < config.total_steps:
      batch = s.to_device(_model_inputs(config, next(data_iter)))
      data_state = data_iter.get_state()  # Points at the batch after this one.
      shapes = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))
      if shapes not in compiled:
        compiled[shapes] = clock.compile(s.step, state, batch, s.frozen)
        if is_main and config.progress_bar and progress is None:  # ETA without the compile.
          progress = _progress_bar(config.total_steps, start_step)
      state, metrics = compiled[shapes](state, batch, s.frozen)
      step += 1
      window.append(metrics)
      if progress is not None:
        progress.update(1)
      if step % config.log_every == 0 or step == config.total_steps:
        seconds, extra = clock.window(metrics)
        row = {**_summarise(window, seconds, config, flops_per_image), **extra}
        if len(window) < step - (step - 1) // config.log_every * config.log_every:
          row["partial_window"] = True  # Begun before a restart: only the steps after it.
        _log_row(writer, progress, step, row)
        if row["bad_steps"] >= config.max_bad_steps:
          raise _non_finite_stop(row, step, mngr)
        window = []
      if _periodic_due(config, step):
        with clock.paused(metrics):  # Sampling and evaluation are not training time.
          _sample_and_evaluate(s, s.host_state(state), step, workdir, writer, best_mngr, data_state)
      preempted = preemption.now(mngr, step)
      if step % config.ckpt_every == 0 or step == config.total_steps or preempted:
        with clock.paused(metrics):  # Its checksums wait for the step; the write is async.
          checkpoint.save(mngr, s.host_state(state), data_state, force=preempted)
      if preempted:
        mngr.wait_until_finished()
        print(f"SIGTERM: saved checkpoint at step {step}; exiting.", file=sys.stderr, flush=True)
        raise SystemExit(143)
  finally:
    writer.close()
    if progress is not None:
      progress.close()
    preemption.close()
  return s.host_state(state)


class Throughput:
  """Steps/s of completed steps, not of dispatched ones (JAX runs ahead of the devices).

  A log window runs from the end of the previous one (the first: from the end of the
  compile, which is reported once as compile_seconds) to the moment its last step has
  finished; time spent sampling, evaluating and starting checkpoint saves in between
  (`paused`) is left out.
  """

  def __init__(self):
    self.start = time.perf_counter()
    self.compile_seconds = None
    self.compiles = 0

  def compile(self, step_fn, *args):
    """step_fn compiled for args (ahead of time, so no step's time holds the compile); a later
    compile (a new batch shape: an aspect-ratio bucket) is left out of its window too."""
    begin = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    end = time.perf_counter()
    self.start = end if not self.compiles else self.start + (end - begin)
    self.compile_seconds = (self.compile_seconds or 0.0) + (end - begin)
    self.compiles += 1
    return compiled

  def window(self, metrics) -> tuple[float, dict]:
    """(seconds of the window that ends with the step that returned `metrics`, extra fields
    of its row: compile_seconds on the first)."""
    jax.block_until_ready(metrics)  # Every step of the window has run.
    now = time.perf_counter()
    seconds, self.start = now - self.start, now
    extra = {} if self.compile_seconds is None else {"compile_seconds": self.compile_seconds}
    self.compile_seconds = None
    return seconds, extra

  @contextlib.contextmanager
  def paused(self, metrics):
    jax.block_until_ready(metrics)  # The steps before the pause count as training time.
    begin = time.perf_counter()
    try:
      yield
    finally:
      self.start += time.perf_counter() - begin


def _progress_bar(total: int, initial: int):
  """A tqdm bar whose rate and ETA are the measured steps/s of the last log row."""
  from tqdm import tqdm

  class Progress(tqdm):
    measured_rate = None

    @property
    def format_dict(self):
      fields = super().format_dict
      if self.measured_rate:
        fields["rate"] = self.measured_rate
      return fields

  return Progress(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _log_row(writer, progress, step: int, row: dict) -> None:
  writer.write(step, row)
  if progress is not None:
    progress.measured_rate = row["steps_per_sec"]
    progress.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)


def _non_finite_stop(row: dict, step: int, mngr) -> FloatingPointError:
  """The error that stops a run after config.max_bad_steps non-finite steps in a row."""
  mngr.wait_until_finished()
  last = mngr.latest_step()
  where = (
    f"the last checkpoint, step {last} in {mngr.directory}, holds only finite values"
    if last is not None
    else "no checkpoint was saved"
  )
  return FloatingPointError(
    f"{int(row['bad_steps'])} consecutive non-finite steps up to step {step} "
    f"({int(row['skipped_steps'])} skipped in all; last loss={row['loss']}, "
    f"grad_norm={row['grad_norm']}); stopping: {where}. A resumed run repeats these steps: "
    "if the data holds NaN/Inf, fix config.data; if training diverged, lower "
    "config.optim.lr or set config.optim.grad_clip."
  )


def _periodic_due(config, step: int) -> bool:
  sample = config.sample_every and step % config.sample_every == 0
  return bool(sample or (eval_every(config) and step % eval_every(config) == 0))


def _sample_and_evaluate(s: Setup, host: State, step, workdir, writer, best_mngr, data_state):
  """Sample grids every config.sample_every steps, evaluation every config.eval.every."""
  config = s.config
  if config.sample_every and step % config.sample_every == 0:
    params = _eval_params(s, host)
    if jax.process_index() == 0:
      _write_samples(s, params, workdir, f"samples/step_{step:06d}.png", writer, step)
  if eval_every(config) and step % eval_every(config) == 0:
    results = _evaluate(config, s.model, _eval_params(s, host), step)
    writer.write(step, {f"eval/{k}": v for k, v in results.items()})
    checkpoint.save(best_mngr, host, data_state, metrics=results)


def _model_inputs(config, batch: dict) -> dict:
  """What the update step consumes (no caption strings), with the image sizes of models that
  are conditioned on them (the batch's size: one aspect-ratio bucket's, or the trained one)."""
  keep = ("image", "latent", *objectives.base.COND_KEYS, *objectives.repa.BATCH_KEYS)
  inputs = {k: v for k, v in batch.items() if k in keep}
  x = inputs["latent" if "latent" in inputs else "image"]
  sizes = generate.size_cond(config, len(x), size=np.shape(x)[1:3])
  return {**inputs, **{k: np.asarray(v) for k, v in sizes.items() if k not in inputs}}


def _evaluate(config, model, params, step: int) -> dict[str, float]:
  """The evaluation metrics of `params`; every process computes them (same samples)."""
  results = evaluation.evaluate(config, model, params, jax.random.PRNGKey(config.seed))
  results = {k: float(v) for k, v in results.items() if np.ndim(v) == 0}
  if config.eval.best_metric not in results:
    raise UserError(
      f"config.eval.best_metric={config.eval.best_metric!r} is not among the evaluation "
      f"metrics {sorted(results)}."
    )
  if jax.process_index() == 0:
    print(f"eval at step {step}: {config.eval.best_metric}={results[config.eval.best_metric]:.4g}")
  return results


def _write_samples(s: Setup, params, workdir: str, name: str, writer=None, step: int = 0):
  """The class grid as workdir/name (and as a TensorBoard image with a writer)."""
  config = s.config
  images = generate.class_grid(config, s.model, params, s.schedule, jax.random.PRNGKey(config.seed))
  path = os.path.join(workdir, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  grid = generate.grid_image(
    images,
    nrow=config.model.num_classes or 10,
    row_labels=generate.grid_row_labels(config),
    caption=generate.grid_caption(config),
  )
  grid.save(path)
  if writer is not None:
    writer.image("samples", np.asarray(grid), step)


# ---- Command line ------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Command-line flags, defined only when run as a command (modules import cleanly)."""
  cli_lib.define_config_flags(
    flag_values,
    "Directory for checkpoints, logs and samples; a workdir that holds a run resumes it (a "
    "changed config is checked field by field, allowed changes go to config_history.jsonl).",
  )
  flags.DEFINE_string(
    "init_from",
    None,
    "Fine-tuning: a workdir (or its ckpt/ or ckpt/STEP) whose EMA params start this new run "
    "(step 0, a fresh optimizer); their shapes must fit config.model.",
    flag_values=flag_values,
  )


def help_notes() -> str:
  return evaluation.choices_text()


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None:
    raise UserError("--workdir is required (with --config for a new run).")
  config, _ = checkpoint.command_config(FLAGS.workdir, FLAGS.config, cli_lib.workdir_overrides())
  if FLAGS.config_keys:
    print(cli_lib.config_keys_text(config))
    return
  logging.set_verbosity(logging.WARNING)
  train_and_evaluate(config, FLAGS.workdir, init_from=FLAGS.init_from)


def cli() -> None:
  """Console-script entry point (`dit-train`)."""
  run_command(main, define_flags, __doc__, help_notes)


if __name__ == "__main__":
  cli()
