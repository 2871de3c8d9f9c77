"""The train loop: one file, read top to bottom.

  python -m dit.train --config=configs/digits.py --workdir=runs/digits [--config.key=value]

Sections: workdir and logging -> devices and mesh -> input pipeline -> model, optimizer,
EMA -> update step -> restore checkpoint -> loop (step, log, sample, evaluate, save).

Randomness: every example's timestep, noise and label drop come from
`fold_in(fold_in(seed_key, step), global_example_index)`, so a run is the same on any
number of devices, hosts or micro-batches (up to float summation order) and bit-identical
when rerun on the same devices; a resumed run continues the exact same stream.

Parallelism (config.parallelism):
- "pmap": `jax.pmap` data parallelism; the state is replicated (a leading device axis),
  gradients are averaged with `lax.pmean`.
- "mesh": `jax.jit` over a ("data", "fsdp", "tensor") mesh (config.mesh); parameters and
  optimizer state are sharded by dit.parallel's rules, the batch over data x fsdp.
Both save the same checkpoint layout (unstacked, unsharded shapes), so a checkpoint restores
onto any device count, mesh or path.

Consistency distillation (config.distill, see dit/distill.py) runs through the same loop:
the update step takes the frozen teacher's params as a third argument and minimises the
LCM objective (dit.diffusion.consistency) with the EMA params as the target network.

Failure handling: a non-finite loss or gradient skips the update (counted); more than
config.max_bad_steps consecutive ones stop the run. SIGTERM saves a checkpoint at the next
step boundary and exits with 143. A checkpoint that cannot be read is skipped for the
previous one, with a warning.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import flags, logging
from ml_collections import config_flags

from dit import distill, hardware, parallel
from dit.cli import UserError, config_diffs, run_command
from dit.data import pipeline
from dit.diffusion import consistency, guidance, losses, schedules
from dit.models import dit as dit_model

State = dict[str, Any]

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
  if eval_every(config):
    from dit import evaluate as evaluate_lib

    evaluate_lib.check_eval_config(config)  # Now, not after the first eval.every steps.
    if config.eval.best_mode not in ("min", "max"):
      raise UserError(
        f"config.eval.best_mode must be 'min' or 'max', got {config.eval.best_mode!r}."
      )


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` (its parent must exist) and checks that it is writable."""
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


def eval_every(config: ml_collections.ConfigDict) -> int:
  """config.eval.every, 0 (no evaluation during training) for configs without an eval section."""
  return config.eval.every if "eval" in config else 0


# Sections whose change makes an old checkpoint meaningless for this run.
_RESUME_SECTIONS = ("model", "diffusion", "data", "seed", "batch_size", "distill")


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A restarted run must match the saved config in the fields that shape the state."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(config.to_json_best_effort())
  diffs = [
    f"{key}: checkpoint has {a!r}, config has {b!r}"
    for key, a, b in config_diffs(old, new, _RESUME_SECTIONS)
  ]
  if diffs:
    raise UserError(
      f"{workdir} holds a run with an incompatible config; use a new --workdir or the "
      "same settings. Differing fields: " + "; ".join(diffs)
    )


# ---- Model, optimizer, state ------------------------------------------------------


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[Any, optax.Schedule]:
  """AdamW with linear warmup then constant or cosine decay, optional global-norm clip."""
  o = config.optim
  if o.schedule == "constant":
    lr = optax.constant_schedule(o.lr)
  elif o.schedule == "cosine":
    lr = optax.cosine_decay_schedule(o.lr, max(1, config.total_steps - o.warmup_steps))
  else:
    raise UserError(f"config.optim.schedule must be 'constant' or 'cosine', got {o.schedule!r}.")
  if o.warmup_steps > 0:
    warmup = optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    lr = optax.join_schedules([warmup, lr], [o.warmup_steps])
  tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, lr


def model_input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  m = config.model
  return (m.input_size, m.input_size, m.in_channels)


def init_state(config: ml_collections.ConfigDict, model, tx, init_params=None) -> State:
  """The whole training state as a pytree: what a checkpoint holds (float32 params).

  init_params: a distillation teacher's params; they replace the fresh ones they cover.
  """
  key = jax.random.PRNGKey(config.seed)
  init_key, train_key = jax.random.split(key)
  x = jnp.zeros((1, *model_input_shape(config)), jnp.float32)
  params = model.init(init_key, x, jnp.zeros((1,), jnp.float32), example_cond(config, 1))["params"]
  if init_params is not None:
    params = distill.student_params(params, init_params)
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "ema_params": params,
    "opt_state": tx.init(params),
    "rng": train_key,
    "bad_steps": jnp.zeros((), jnp.int32),  # Consecutive non-finite steps.
    "skipped_steps": jnp.zeros((), jnp.int32),  # All non-finite steps so far.
  }


def example_cond(config: ml_collections.ConfigDict, batch: int) -> dict | None:
  """A dummy condition with the shapes the model expects (for init and tracing)."""
  cond = {}
  if config.model.num_classes:
    cond["label"] = jnp.zeros((batch,), jnp.int32)
  if config.model.get("caption_channels", 0):
    length = config.data.get("max_text_length", 120)
    cond["text"] = jnp.zeros((batch, length, config.model.caption_channels), jnp.float32)
    cond["text_mask"] = jnp.ones((batch, length), jnp.int32)
  if config.model.get("guidance_embedding", False):
    cond["guidance"] = jnp.ones((batch,), jnp.float32)
  return cond or None


def batch_cond(batch: dict) -> dict:
  return {k: batch[k] for k in ("label", "text", "text_mask") if k in batch}


# ---- The update step -----------------------------------------------------------------


def make_update_fn(
  config, model, schedule, tx, lr_schedule, axis_name: str | None, teacher_model=None
):
  """Returns `update(state, batch, teacher) -> (state, metrics)`, pure and jittable.

  With `axis_name` it runs inside pmap: the batch is this device's slice, gradients
  and metrics are averaged over the axis. Mixed precision is the model's compute dtype
  (config.model.dtype): params, gradients, optimizer state and EMA stay float32.
  teacher: the frozen teacher's params, needed for consistency distillation (when
  `teacher_model` is given), unused otherwise.
  """
  d, o = config.diffusion, config.optim
  drop_prob = config.model.get("class_dropout_prob", 0.0)
  policy = config.get("step_remat_policy", "")

  def forward(params, x_t, t, cond):
    return model.apply({"params": params}, x_t, t, cond)

  if policy:
    # Recompute the forward in the backward pass, keeping what the policy saves.
    forward = jax.checkpoint(forward, policy=getattr(jax.checkpoint_policies, policy))

  def example_keys(state, num):
    offset = jax.lax.axis_index(axis_name) * num if axis_name else 0
    step_key = jax.random.fold_in(state["rng"], state["step"])
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(offset + jnp.arange(num))

  def per_example(keys, fn, i):
    """fn(key) for each example's i-th subkey: draws that do not depend on how the batch is
    split over devices or micro-batches."""
    return jax.vmap(lambda k: fn(jax.random.fold_in(k, i)))(keys)

  def loss_fn(params, micro):
    x0, keys = micro["x0"], micro["keys"]
    cond = batch_cond(micro)
    # Timestep, noise and the label/caption dropout for CFG.
    t = per_example(keys, lambda k: jax.random.randint(k, (), 0, schedule.T), 0)
    noise = per_example(keys, lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype), 1)
    cond["drop"] = per_example(keys, lambda k: jax.random.bernoulli(k, drop_prob), 2)
    loss, _ = losses.diffusion_loss(
      lambda x_t, t: forward(params, x_t, t, cond),
      x0,
      keys[0],  # Unused: t and noise are given.
      schedule,
      prediction=d.prediction,
      weighting=d.weighting,
      min_snr_gamma=d.min_snr_gamma,
      learn_sigma=config.model.learn_sigma,
      t=t,
      noise=noise,
    )
    return loss.mean()

  def distill_loss_fn(params, micro, target, teacher):
    """The consistency-distillation loss, the EMA params `target` being the target network."""
    x0, keys = micro["x0"], micro["keys"]
    dc = config.distill
    index = per_example(keys, lambda k: jax.random.randint(k, (), 0, dc.num_ddim_timesteps), 0)
    noise = per_example(keys, lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype), 1)
    w = per_example(
      keys, lambda k: jax.random.uniform(k, (), minval=dc.guidance_min, maxval=dc.guidance_max), 2
    )
    cond = batch_cond(micro)
    student_cond = dict(cond, guidance=w)
    teacher_fn = guidance.cfg_denoise(
      lambda x, t, c: teacher_model.apply({"params": teacher}, x, t, c), cond, w
    )
    loss, _ = consistency.distillation_loss(
      lambda x, t: forward(params, x, t, student_cond),
      teacher_fn,
      lambda x, t: model.apply({"params": target}, x, t, student_cond),
      x0,
      schedule,
      index=index,
      noise=noise,
      num_ddim_timesteps=dc.num_ddim_timesteps,
      prediction=d.prediction,
      solver=dc.solver,
      distance=dc.distance,
      huber_c=dc.huber_c,
      timestep_scaling=dc.timestep_scaling,
    )
    return loss.mean()

  def update(state, batch, teacher=None):
    x0 = batch["latent"] if "latent" in batch else batch["image"]
    micro = dict(batch_cond(batch), x0=x0, keys=example_keys(state, x0.shape[0]))
    k = config.grad_accum_steps
    if teacher_model is None:
      grad_fn = jax.value_and_grad(loss_fn)
    else:
      grad_fn = jax.value_and_grad(
        lambda params, mb: distill_loss_fn(params, mb, state["ema_params"], teacher)
      )
    if k == 1:
      loss, grads = grad_fn(state["params"], micro)
    else:
      # Micro-batch j takes examples j, j + k, ...: a strided split keeps every micro-batch
      # spread over all data-parallel devices (a contiguous one would sit on a few).
      micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), micro
      )

      def accumulate(carry, mb):
        loss, grads = grad_fn(state["params"], mb)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
      loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))
    if axis_name:
      loss, grads = jax.lax.pmean((loss, grads), axis_name)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"]
    decay = o.ema_decay
    if o.ema_warmup:
      decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema_params"], params)

    # NaN/Inf guard: a bad step changes nothing but the counters, so a checkpoint never
    # holds non-finite values.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o_: jnp.where(ok, n, o_), new, old)
    new_state = {
      "step": step + 1,
      "params": keep(params, state["params"]),
      "ema_params": keep(ema, state["ema_params"]),
      "opt_state": keep(opt_state, state["opt_state"]),
      "rng": state["rng"],
      "bad_steps": jnp.where(ok, 0, state["bad_steps"] + 1),
      "skipped_steps": state["skipped_steps"] + (~ok).astype(jnp.int32),
    }
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": lr_schedule(step),
      "bad_steps": new_state["bad_steps"],
      "skipped_steps": new_state["skipped_steps"],
    }
    return new_state, metrics

  return update


# ---- Checkpoints ----------------------------------------------------------------------


def checkpoint_manager(
  workdir: str, config: ml_collections.ConfigDict, best: bool = False
) -> ocp.CheckpointManager:
  """ckpt/: the last config.keep_ckpts steps; ckpt_best/: the best by config.eval.best_metric.

  Saves are asynchronous (the step loop goes on while they are written) and atomic: a save
  is written to a temporary directory and renamed when complete, so a run killed mid-save
  leaves the previous checkpoints intact; leftovers are removed on the next start.
  """
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
  if best:
    metric = config.eval.best_metric
    options = ocp.CheckpointManagerOptions(
      max_to_keep=1,
      best_fn=lambda metrics: metrics[metric],
      best_mode=config.eval.best_mode,
      keep_checkpoints_without_metrics=False,
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(
      os.path.join(workdir, "ckpt_best"), options=options, item_handlers=handlers
    )
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_ckpts,
    create=True,
    cleanup_tmp_directories=True,
    enable_async_checkpointing=True,
  )
  return ocp.CheckpointManager(
    os.path.join(workdir, "ckpt"), options=options, item_handlers=handlers
  )


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def save_checkpoint(
  mngr, state: State, data_state: dict, force: bool = False, metrics: dict | None = None
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


def _check_compatible(mngr, step: int, abstract_state: State) -> None:
  """Raises `UserError` naming the parameters whose saved shapes differ from the config's."""
  try:
    saved = mngr.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)["params"]
  except Exception:  # Unreadable metadata: the restore below reports it.
    return
  shapes = lambda tree: {
    parallel.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }
  saved, wanted = shapes(saved), shapes(abstract_state["params"])
  diffs = [f"{k}: missing from the checkpoint" for k in sorted(set(wanted) - set(saved))]
  diffs += [f"{k}: not in this model" for k in sorted(set(saved) - set(wanted))]
  diffs += [
    f"{k}: checkpoint {saved[k]}, config {wanted[k]}"
    for k in sorted(set(saved) & set(wanted))
    if saved[k] != wanted[k]
  ]
  if diffs:
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    raise UserError(
      f"The checkpoint at step {step} in {mngr.directory} was written for a different model "
      f"(params: {shown}); use a new --workdir or the matching config.model."
    )


def restore_checkpoint(mngr, abstract_state: State) -> tuple[State, dict] | None:
  """Restores the newest readable checkpoint onto the shardings of `abstract_state`.

  Leaves without a sharding go to the first local device. Orbax reshards, so the checkpoint
  may come from any device count or mesh. A checkpoint that cannot be read (corrupt, half
  deleted) is skipped for the previous one, with a warning. Returns None if there is none.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with_sharding = lambda x: jax.ShapeDtypeStruct(
    x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device
  )
  abstract_state = jax.tree.map(with_sharding, abstract_state)
  steps = sorted(mngr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    _check_compatible(mngr, step, abstract_state)
    try:
      restored = mngr.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
      )
      return restored["state"], restored["data"]
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
  return None


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
      self.tb.add_scalar(k, v, step)
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
  """Host floats for one log row from the per-step metrics since the last row."""
  steps = [{k: float(parallel.first_value(v)) for k, v in m.items()} for m in window]
  row = {
    "loss": float(np.mean([s["loss"] for s in steps])),
    "grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
    "lr": steps[-1]["lr"],
    "bad_steps": max(s["bad_steps"] for s in steps),  # Longest non-finite streak seen.
    "skipped_steps": steps[-1]["skipped_steps"],
    "steps_per_sec": len(steps) / elapsed,
  }
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
    from dit import info

    return info.model_info(model)["gflops_train"] * 1e9
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> State:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the state.

  The returned state is unstacked (no device axis): replicated for "pmap", sharded over the
  mesh for "mesh".
  """
  # Workdir and logging.
  if config.distributed:
    parallel.initialize_distributed()
  workdir = prepare_workdir(workdir)
  check_resume_config(workdir, config)
  is_main = jax.process_index() == 0

  # Devices and mesh.
  use_pmap = config.parallelism == "pmap"
  try:
    mesh = parallel.pmap_mesh() if use_pmap else parallel.make_mesh(config.mesh)
  except ValueError as e:
    raise UserError(str(e)) from e
  num_dp = jax.device_count() if use_pmap else parallel.data_parallel_size(mesh)
  check_config(config, num_dp)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    _print_run_summary(config, workdir, mesh)

  # Input pipeline: each process reads its own rows of every global batch.
  data_iter = pipeline.make_train_iterator(
    config.data,
    global_batch_size=config.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )

  # Model, optimizer, EMA, schedule.
  model = dit_model.build_model(config.model)
  tx, lr_schedule = make_optimizer(config)
  schedule = schedules.make_schedule(
    config.diffusion.schedule,
    config.diffusion.num_timesteps,
    beta_start=config.diffusion.beta_start,
    beta_end=config.diffusion.beta_end,
  )
  init_fn = functools.partial(init_state, config, model, tx)
  abstract_state = jax.eval_shape(init_fn)
  teacher_model, teacher = None, {}
  if distill.enabled(config):
    teacher_model, teacher = distill.load_teacher(config)

  # Shardings of the (unstacked) state: replicated for pmap, by the rules for the mesh.
  replicated = parallel.replicated(mesh)
  if use_pmap:
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  else:
    fsdp_min = config.mesh.get("fsdp_min_size", 2**14)
    state_sharding = parallel.state_sharding(abstract_state, mesh, min_fsdp_size=fsdp_min)
  abstract_state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding
  )

  # Update step: pmap or jit over the mesh; the state buffers are donated. A distillation
  # teacher is placed like the params: replicated (pmap) or by the sharding rules (mesh).
  if use_pmap:
    update = make_update_fn(
      config, model, schedule, tx, lr_schedule, axis_name="batch", teacher_model=teacher_model
    )
    step_fn = jax.pmap(update, axis_name="batch", donate_argnums=(0,))
    to_device = functools.partial(parallel.pmap_batch, mesh=mesh)
    teacher_sharding = jax.tree.map(lambda _: replicated, teacher)
  else:
    update = make_update_fn(
      config, model, schedule, tx, lr_schedule, axis_name=None, teacher_model=teacher_model
    )
    batch_sharding = parallel.batch_sharding(mesh)
    teacher_sharding = parallel.state_sharding(teacher, mesh, min_fsdp_size=fsdp_min)
    step_fn = jax.jit(
      update,
      in_shardings=(state_sharding, batch_sharding, teacher_sharding),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,),
    )
    to_device = functools.partial(parallel.global_batch, sharding=batch_sharding)
  teacher = jax.device_put(teacher, teacher_sharding)

  # Restore the latest checkpoint, or initialise.
  mngr = checkpoint_manager(workdir, config)
  best_mngr = checkpoint_manager(workdir, config, best=True) if eval_every(config) else None
  restored = restore_checkpoint(mngr, abstract_state)
  if restored is not None:
    state, data_state = restored
    data_iter.set_state(data_state)
  elif teacher_model is not None:  # The student starts as the teacher.
    state = jax.jit(lambda t: init_fn(init_params=t), out_shardings=state_sharding)(teacher)
  else:
    state = jax.jit(init_fn, out_shardings=state_sharding)()
  start_step = int(parallel.first_value(state["step"]))
  if is_main and restored is not None:
    print(f"Resumed from step {start_step}.", flush=True)
  if use_pmap:
    state = parallel.stack_for_pmap(state, mesh)
    teacher = parallel.stack_for_pmap(teacher, mesh)

  def host_state():
    """The unstacked state: what checkpoints hold."""
    return parallel.unstack_from_pmap(state, mesh) if use_pmap else state

  def eval_params(unstacked):
    """Params for sampling on this process's first device (all processes must call)."""
    params = unstacked["ema_params"] if config.sample.use_ema else unstacked["params"]
    return parallel.local_copy(parallel.gather(params, mesh))

  # Preemption: SIGTERM saves a checkpoint at the next step boundary, then exits. On
  # multi-host jobs JAX's preemption service agrees on that step across hosts.
  preempted = []
  multi_host = jax.process_count() > 1
  previous_handler = None
  if not multi_host:
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

  # Rows after the restored step (logged before a crash) are dropped: they are redone.
  writer = MetricWriter(workdir, resume_step=start_step)
  flops_per_image = _train_flops_per_image(model) if is_main else None
  progress = None
  if is_main and config.progress_bar:
    from tqdm import tqdm

    progress = tqdm(total=config.total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  compiled, window = None, []
  step, data_state = start_step, data_iter.get_state()
  window_start = time.perf_counter()
  try:
    while step < config.total_steps:
      batch = to_device(_model_inputs(next(data_iter)))
      data_state = data_iter.get_state()  # Points at the batch after this one.
      if compiled is None:
        compiled = step_fn.lower(state, batch, teacher).compile()
        window_start = time.perf_counter()  # Steps/s without the compile.
      state, metrics = compiled(state, batch, teacher)
      step += 1
      window.append(metrics)
      if progress is not None:
        progress.update(1)

      if step % config.log_every == 0 or step == config.total_steps:
        row = _summarise(window, time.perf_counter() - window_start, config, flops_per_image)
        writer.write(step, row)
        if progress is not None:
          progress.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        if row["bad_steps"] >= config.max_bad_steps:
          raise FloatingPointError(
            f"{int(row['bad_steps'])} consecutive non-finite steps up to step {step} "
            f"({int(row['skipped_steps'])} skipped in all; last loss={row['loss']}, "
            f"grad_norm={row['grad_norm']}); stopping. The checkpoints hold only finite "
            "values; try a lower config.optim.lr or config.optim.grad_clip."
          )
        window, window_start = [], time.perf_counter()

      if config.sample_every and step % config.sample_every == 0:
        params = eval_params(host_state())
        if is_main:
          _write_samples(config, model, params, schedule, workdir, f"samples/step_{step:06d}.png")

      if eval_every(config) and step % eval_every(config) == 0:
        results = _evaluate(config, model, eval_params(host_state()), step)
        writer.write(step, {f"eval/{k}": v for k, v in results.items()})
        save_checkpoint(best_mngr, host_state(), data_state, metrics=results)

      preempted_now = bool(preempted) or (multi_host and mngr.reached_preemption(step))
      if step % config.ckpt_every == 0 or step == config.total_steps or preempted_now:
        save_checkpoint(mngr, host_state(), data_state, force=preempted_now)
      if preempted_now:
        mngr.wait_until_finished()
        print(f"SIGTERM: saved checkpoint at step {step}; exiting.", file=sys.stderr, flush=True)
        raise SystemExit(143)
  finally:
    mngr.wait_until_finished()
    if best_mngr is not None:
      best_mngr.wait_until_finished()
    writer.close()
    if progress is not None:
      progress.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)

  state = host_state()
  if config.sample.num:
    params = eval_params(state)
    if is_main:
      _write_samples(config, model, params, schedule, workdir, "grid.png")
  return state


def _model_inputs(batch: dict) -> dict:
  """Drops what the update step does not consume (e.g. caption strings)."""
  return {k: v for k, v in batch.items() if k in ("image", "latent", "label", "text", "text_mask")}


def _evaluate(config, model, params, step: int) -> dict[str, float]:
  """dit.evaluate's metrics of `params`; every process computes them (same samples)."""
  from dit import evaluate as evaluate_lib

  results = evaluate_lib.evaluate(config, model, params, jax.random.PRNGKey(config.seed))
  results = {k: float(v) for k, v in results.items() if np.ndim(v) == 0}
  if config.eval.best_metric not in results:
    raise UserError(
      f"config.eval.best_metric={config.eval.best_metric!r} is not among the evaluation "
      f"metrics {sorted(results)}."
    )
  if jax.process_index() == 0:
    print(f"eval at step {step}: {config.eval.best_metric}={results[config.eval.best_metric]:.4g}")
  return results


def _write_samples(config, model, params, schedule, workdir, name) -> None:
  from dit import sample as sample_lib

  images = sample_lib.class_grid(config, model, params, schedule, jax.random.PRNGKey(config.seed))
  path = os.path.join(workdir, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sample_lib.save_grid(images, path, nrow=config.model.num_classes or 10)


# ---- Command line ------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a command (modules import cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise UserError("--config and --workdir are required.")
  logging.set_verbosity(logging.WARNING)
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


def cli() -> None:
  """Console-script entry point (`dit-train`)."""
  define_flags()
  run_command(main)


if __name__ == "__main__":
  cli()
