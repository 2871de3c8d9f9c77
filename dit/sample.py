"""Sampling from a trained DiT: library functions and the `dit.sample` command.

  python -m dit.sample --config=configs/digits.py --workdir=runs/digits --num=100 \
      --out=grid.png [--sampler=ddim --steps=50 --cfg_scale=4.0 --seed=0]

The whole sampling loop is one jitted `lax.scan` (dit.diffusion.samplers); classifier-free
guidance runs the conditional and unconditional halves as one batch.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from ml_collections import config_flags
from PIL import Image

from dit.cli import UserError, run_command
from dit.diffusion import guidance, samplers, schedules


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  d = config.diffusion
  return schedules.make_schedule(
    d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "model",
    "shape",
    "sampler",
    "steps",
    "prediction",
    "learn_sigma",
    "eta",
    "cfg_scale",
  ),
)
def _generate(
  params,
  cond,
  key,
  schedule,
  cfg_scale,
  eta,
  *,
  model,
  shape,
  sampler,
  steps,
  prediction,
  learn_sigma,
):
  noise_key, sample_key = jax.random.split(key)
  x_T = jax.random.normal(noise_key, shape, jnp.float32)

  def model_fn(x, t, c):
    return model.apply({"params": params}, x, t, c)

  if cond is None:
    denoise = lambda x, t: model_fn(x, t, None)
  else:
    denoise = guidance.cfg_denoise(model_fn, cond, cfg_scale)
  return samplers.sample(
    denoise,
    x_T,
    sample_key,
    schedule,
    sampler=sampler,
    steps=steps,
    prediction=prediction,
    learn_sigma=learn_sigma,
    eta=eta,
  )


def generate(
  config: ml_collections.ConfigDict,
  model,
  params,
  cond: dict | None,
  key: jax.Array,
  num: int,
  *,
  schedule: schedules.Schedule | None = None,
  sampler: str | None = None,
  steps: int | None = None,
  cfg_scale: float | None = None,
) -> jax.Array:
  """Samples `num` images (num, H, W, C) in [-1, 1]; `cond` holds (num, ...) arrays."""
  s = config.sample
  sampler = sampler or s.sampler
  if sampler not in samplers.SAMPLERS:
    raise UserError(f"Unknown sampler {sampler!r}; valid samplers: {', '.join(samplers.SAMPLERS)}.")
  steps = steps or s.steps
  if not 1 <= steps <= config.diffusion.num_timesteps:
    raise UserError(f"--steps must be in [1, {config.diffusion.num_timesteps}], got {steps}.")
  m = config.model
  images = _generate(
    params,
    cond,
    key,
    schedule if schedule is not None else make_schedule(config),
    cfg_scale=float(s.cfg_scale if cfg_scale is None else cfg_scale),
    eta=float(s.eta),
    model=model,
    shape=(num, m.input_size, m.input_size, m.in_channels),
    sampler=sampler,
    steps=steps,
    prediction=config.diffusion.prediction,
    learn_sigma=m.learn_sigma,
  )
  return jnp.clip(images, -1.0, 1.0)


def grid_labels(num: int, num_classes: int) -> np.ndarray:
  """Labels sorted into equal rows: num=100, 10 classes -> ten of each, row by row."""
  return (np.arange(num) * num_classes // num).astype(np.int32)


def class_grid(config, model, params, schedule, key, num: int | None = None) -> jax.Array:
  """`config.sample.num` class-conditional samples, one row per class."""
  num = num or config.sample.num
  cond = None
  if config.model.num_classes:
    cond = {"label": jnp.asarray(grid_labels(num, config.model.num_classes))}
  return generate(config, model, params, cond, key, num, schedule=schedule)


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8, (N, H, W, C)."""
  images = np.asarray(jax.device_get(images), np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images, path: str, nrow: int = 10, upscale: int | None = None) -> None:
  """Writes (N, H, W, C) images in [-1, 1] as a PNG grid with `nrow` images per row."""
  x = to_uint8(images)
  n, h, w, c = x.shape
  rows = -(-n // nrow)
  x = np.concatenate([x, np.zeros((rows * nrow - n, h, w, c), np.uint8)])
  x = x.reshape(rows, nrow, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, nrow * w, c)
  image = Image.fromarray(x[..., 0] if c == 1 else x[..., :3])
  upscale = upscale or max(1, 320 // (nrow * w))  # Tiny digits stay visible.
  if upscale > 1:
    image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
  image.save(path)


def load_params(config: ml_collections.ConfigDict, workdir: str, use_ema: bool = True):
  """(model, params) of the newest checkpoint in `workdir` (EMA params by default)."""
  from dit import train
  from dit.models import dit as dit_model

  ckpt_dir = os.path.join(os.path.abspath(workdir), "ckpt")
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"No checkpoints in {workdir!r} (expected {ckpt_dir}); train first.")
  model = dit_model.build_model(config.model)
  tx, _ = train.make_optimizer(config)
  abstract = jax.eval_shape(functools.partial(train.init_state, config, model, tx))
  mngr = ocp.CheckpointManager(ckpt_dir)
  restored = train.restore_checkpoint(mngr, abstract)
  if restored is None:
    raise UserError(f"No readable checkpoint in {ckpt_dir}.")
  state, _ = restored
  return model, state["ema_params" if use_ema else "params"]


# ---- Command line ----------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a command (modules import cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  flags.DEFINE_string("workdir", None, "Training workdir holding ckpt/.")
  flags.DEFINE_integer("num", 64, "Number of samples.")
  flags.DEFINE_string("out", "grid.png", "Output: .png grid or .npz array (uint8 images).")
  flags.DEFINE_string("sampler", None, "Sampler name; default config.sample.sampler.")
  flags.DEFINE_integer("steps", None, "Sampling steps; default config.sample.steps.")
  flags.DEFINE_float("cfg_scale", None, "Guidance scale; default config.sample.cfg_scale.")
  flags.DEFINE_integer("seed", 0, "PRNG seed.")
  flags.DEFINE_list("labels", None, "Class labels (default: equal rows of all classes).")
  flags.DEFINE_bool("raw_params", False, "Use the raw instead of the EMA parameters.")


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise UserError("--config and --workdir are required.")
  config = FLAGS.config
  if FLAGS.num < 1:
    raise UserError(f"--num must be positive, got {FLAGS.num}.")
  model, params = load_params(config, FLAGS.workdir, use_ema=not FLAGS.raw_params)
  cond = None
  if config.model.num_classes:
    if FLAGS.labels:
      labels = np.resize(np.asarray([int(v) for v in FLAGS.labels], np.int32), FLAGS.num)
      if labels.min() < 0 or labels.max() >= config.model.num_classes:
        raise UserError(f"--labels must be in [0, {config.model.num_classes}), got {FLAGS.labels}.")
    else:
      labels = grid_labels(FLAGS.num, config.model.num_classes)
    cond = {"label": jnp.asarray(labels)}
  images = generate(
    config,
    model,
    params,
    cond,
    jax.random.PRNGKey(FLAGS.seed),
    FLAGS.num,
    sampler=FLAGS.sampler,
    steps=FLAGS.steps,
    cfg_scale=FLAGS.cfg_scale,
  )
  out = FLAGS.out
  if out.endswith(".npz"):
    np.savez(out, images=to_uint8(images))
  else:
    save_grid(images, out, nrow=int(np.ceil(np.sqrt(FLAGS.num))))
  print(f"wrote {out}")


def cli() -> None:
  """Console-script entry point (`dit-sample`)."""
  define_flags()
  run_command(main)


if __name__ == "__main__":
  cli()
