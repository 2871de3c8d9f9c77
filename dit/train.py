"""The train loop: one file, read top to bottom.

  python -m dit.train --config=configs/digits.py --workdir=runs/digits [--config.key=value]

Sections: workdir and logging -> devices and mesh -> input pipeline -> model, optimizer,
EMA -> update step -> restore checkpoint -> loop (step, log, sample, save).

Randomness: every example's timestep, noise and label drop come from
`fold_in(fold_in(seed_key, step), global_example_index)`, so a run is the same on any
number of devices (up to float summation order) and bit-identical when rerun on the
same device count; a resumed run continues the exact same stream.
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
import optax
import orbax.checkpoint as ocp
from absl import flags, logging
from ml_collections import config_flags

from dit import hardware, parallel
from dit.cli import UserError, run_command
from dit.data import pipeline
from dit.diffusion import losses, schedules
from dit.models import dit as dit_model

State = dict[str, Any]


# ---- Config checks and workdir -------------------------------------------------


def check_config(config: ml_collections.ConfigDict, num_data_parallel: int) -> None:
  """Raises `UserError` for settings that cannot work, naming the value."""
  if config.batch_size <= 0:
    raise UserError(f"config.batch_size must be positive, got {config.batch_size}.")
  if config.total_steps <= 0:
    raise UserError(f"config.total_steps must be positive, got {config.total_steps}.")
  if config.parallelism not in ("pmap", "mesh"):
    raise UserError(f"config.parallelism must be 'pmap' or 'mesh', got {config.parallelism!r}.")
  per_step = num_data_parallel * config.grad_accum_steps
  if config.grad_accum_steps < 1 or config.batch_size % per_step:
    raise UserError(
      f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
      f"({num_data_parallel} devices) x config.grad_accum_steps ({config.grad_accum_steps})."
    )


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` (its parent must exist) and checks that it is writable."""
  workdir = os.path.abspath(workdir)
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise UserError(f"The parent of --workdir does not exist: {parent!r}.")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir {workdir!r} is not writable: {e.strerror}.") from e
  return workdir


# Sections whose change makes an old checkpoint meaningless for this run.
_RESUME_SECTIONS = ("model", "diffusion", "data", "seed", "batch_size")


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A restarted run must match the saved config in the fields that shape the state."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(config.to_json())
  diffs = []

  def walk(a, b, prefix):
    if isinstance(a, dict) and isinstance(b, dict):
      for k in sorted(set(a) | set(b)):
        walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    elif a != b:
      diffs.append(f"{prefix}: checkpoint has {a!r}, config has {b!r}")

  for section in _RESUME_SECTIONS:
    walk(old.get(section), new.get(section), section)
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


def init_state(config: ml_collections.ConfigDict, model, tx) -> State:
  """The whole training state as a pytree: what a checkpoint holds."""
  key = jax.random.PRNGKey(config.seed)
  init_key, train_key = jax.random.split(key)
  x = jnp.zeros((1, *model_input_shape(config)), jnp.float32)
  params = model.init(init_key, x, jnp.zeros((1,), jnp.float32), example_cond(config, 1))["params"]
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
  return cond or None


def batch_cond(batch: dict) -> dict:
  return {k: batch[k] for k in ("label", "text", "text_mask") if k in batch}


# ---- The update step -----------------------------------------------------------------


def make_update_fn(config, model, schedule, tx, lr_schedule, axis_name: str | None):
  """Returns `update(state, batch) -> (state, metrics)`, pure and jittable.

  With `axis_name` it runs inside pmap: the batch is this device's slice, gradients
  and metrics are averaged over the axis.
  """
  d, o = config.diffusion, config.optim
  drop_prob = config.model.get("class_dropout_prob", 0.0)

  def example_keys(state, num):
    offset = jax.lax.axis_index(axis_name) * num if axis_name else 0
    step_key = jax.random.fold_in(state["rng"], state["step"])
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(offset + jnp.arange(num))

  def loss_fn(params, micro):
    x0, keys = micro["x0"], micro["keys"]
    cond = batch_cond(micro)
    # Timestep, noise and the label/caption dropout for CFG, drawn per example so that
    # they do not depend on how the batch is split over devices.
    per_example = lambda fn, i: jax.vmap(lambda k: fn(jax.random.fold_in(k, i)))(keys)
    t = per_example(lambda k: jax.random.randint(k, (), 0, schedule.T), 0)
    noise = per_example(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype), 1)
    cond["drop"] = per_example(lambda k: jax.random.bernoulli(k, drop_prob), 2)

    def model_fn(x_t, t):
      return model.apply({"params": params}, x_t, t, cond)

    loss, _ = losses.diffusion_loss(
      model_fn,
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

  def update(state, batch):
    x0 = batch["latent"] if "latent" in batch else batch["image"]
    micro = dict(batch_cond(batch), x0=x0, keys=example_keys(state, x0.shape[0]))
    k = config.grad_accum_steps
    grad_fn = jax.value_and_grad(loss_fn)
    if k == 1:
      loss, grads = grad_fn(state["params"], micro)
    else:
      micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), micro)

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

    # NaN/Inf guard: a bad step changes nothing but the counters.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
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


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_ckpts, create=True, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager(os.path.join(workdir, "ckpt"), options=options)


def save_checkpoint(mngr, state: State, data_state: dict, force: bool = False) -> None:
  step = int(jax.device_get(state["step"]))
  if not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state["params"])):
    raise RuntimeError(f"Refusing to save a non-finite checkpoint at step {step}.")
  mngr.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
    force=force,
  )


def restore_checkpoint(mngr, abstract_state: State) -> tuple[State, dict] | None:
  """Restores the newest readable checkpoint; falls back past corrupt ones, saying so."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = mngr.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
      )
      return restored["state"], restored["data"]
    except Exception as e:  # Orbax raises many types for a damaged checkpoint.
      logging.warning("Checkpoint at step %d is unreadable (%s); trying an older one.", step, e)
      print(f"warning: checkpoint step {step} is unreadable ({type(e).__name__}); falling back.")
  return None


# ---- Logging ----------------------------------------------------------------------------


class MetricWriter:
  """metrics.jsonl + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      from tensorboardX import SummaryWriter

      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
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


# ---- The loop ------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> State:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the state."""
  # Workdir and logging.
  if config.distributed:
    parallel.initialize_distributed()
  workdir = prepare_workdir(workdir)
  check_resume_config(workdir, config)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  devices = jax.devices()
  logging.info("Config:\n%s", config)
  logging.info(
    "Devices: %d global, %d local, %d processes, kind %s",
    len(devices),
    jax.local_device_count(),
    jax.process_count(),
    devices[0].device_kind,
  )

  # Devices and mesh.
  use_pmap = config.parallelism == "pmap"
  mesh = None if use_pmap else parallel.make_mesh(config.mesh)
  num_dp = jax.device_count() if use_pmap else parallel.data_parallel_size(mesh)
  check_config(config, num_dp)

  # Input pipeline: each process reads its own slice of every global batch.
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

  # Update step: pmap or jit over the mesh; the state buffers are donated.
  if use_pmap:
    update = make_update_fn(config, model, schedule, tx, lr_schedule, axis_name="batch")
    p_update = jax.pmap(update, axis_name="batch", donate_argnums=(0,))
    state_sharding = None
  else:
    update = make_update_fn(config, model, schedule, tx, lr_schedule, axis_name=None)
    state_sharding = parallel.state_sharding(abstract_state, mesh)
    abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state,
      state_sharding,
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_update = jax.jit(
      update,
      in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,),
    )

  # Restore the latest checkpoint, or initialise.
  mngr = checkpoint_manager(workdir, config)
  restored = restore_checkpoint(mngr, abstract_state)
  if restored is not None:
    state, data_state = restored
    data_iter.set_state(data_state)
    logging.info("Resumed from step %d.", int(state["step"]))
  else:
    state = jax.jit(init_fn, out_shardings=state_sharding)() if mesh else jax.jit(init_fn)()
  start_step = int(jax.device_get(state["step"]))
  if use_pmap:
    state = parallel.replicate(state)

  # Preemption: SIGTERM saves a checkpoint at the next step boundary, then exits.
  preempted = []
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

  def to_device(batch):
    if use_pmap:
      return parallel.shard_batch(batch)
    return parallel.global_batch(batch, parallel.batch_sharding(mesh))

  def host_state():
    return parallel.unreplicate(state) if use_pmap else state

  writer = MetricWriter(workdir)
  peak = hardware.peak_tflops()
  flops_per_step = None
  progress = None
  if is_main and config.progress_bar:
    from tqdm import tqdm

    progress = tqdm(total=config.total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  step, data_state = start_step, data_iter.get_state()
  window_start, window_steps = time.perf_counter(), 0
  try:
    while step < config.total_steps:
      batch = to_device(_model_inputs(next(data_iter)))
      data_state = data_iter.get_state()  # Points at the batch after this one.
      if flops_per_step is None:
        flops_per_step = _step_flops(p_update, state, batch)
      state, metrics = p_update(state, batch)
      step += 1
      window_steps += 1
      if progress is not None:
        progress.update(1)

      if step % config.log_every == 0 or step == config.total_steps:
        metrics = jax.device_get(parallel.unreplicate(metrics) if use_pmap else metrics)
        elapsed = time.perf_counter() - window_start
        row = {k: float(v) for k, v in metrics.items()}
        row["steps_per_sec"] = window_steps / elapsed
        row["img_per_sec"] = row["steps_per_sec"] * config.batch_size
        if flops_per_step:
          row["tflops_per_device"] = flops_per_step * row["steps_per_sec"] / 1e12
          if peak:
            row["mfu"] = row["tflops_per_device"] / peak
        row.update(hardware.memory_in_use())
        writer.write(step, row)
        if progress is not None:
          progress.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        if row["bad_steps"] >= config.max_bad_steps:
          raise FloatingPointError(
            f"{int(row['bad_steps'])} consecutive non-finite steps up to step {step} "
            f"(loss={row['loss']}, grad_norm={row['grad_norm']}); stopping. The last good "
            "checkpoint is kept; try a lower config.optim.lr or config.optim.grad_clip."
          )
        window_start, window_steps = time.perf_counter(), 0

      if config.sample_every and step % config.sample_every == 0 and is_main:
        _write_samples(
          config, model, host_state(), schedule, workdir, f"samples/step_{step:06d}.png"
        )

      if step % config.ckpt_every == 0 or step == config.total_steps or preempted:
        save_checkpoint(mngr, host_state(), data_state, force=bool(preempted))
      if preempted:
        mngr.wait_until_finished()
        print(f"SIGTERM: saved checkpoint at step {step}; exiting.", file=sys.stderr)
        sys.exit(143)
  finally:
    mngr.wait_until_finished()
    writer.close()
    if progress is not None:
      progress.close()
    signal.signal(signal.SIGTERM, previous_handler)

  state = host_state()
  if is_main and config.sample.num:
    _write_samples(config, model, state, schedule, workdir, "grid.png")
  return state


def _model_inputs(batch: dict) -> dict:
  """Drops what the update step does not consume (e.g. caption strings)."""
  return {k: v for k, v in batch.items() if k in ("image", "latent", "label", "text", "text_mask")}


def _step_flops(p_update, state, batch) -> float | None:
  """FLOPs of one update per device, from XLA's cost analysis of the compiled step."""
  try:
    cost = p_update.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None
  except Exception:  # Cost analysis is best effort; some backends do not provide it.
    return None


def _write_samples(config, model, state, schedule, workdir, name) -> None:
  from dit import sample as sample_lib

  params = state["ema_params"] if config.sample.use_ema else state["params"]
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
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


def cli() -> None:
  """Console-script entry point (`dit-train`)."""
  define_flags()
  run_command(main)


if __name__ == "__main__":
  cli()
