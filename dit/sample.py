"""`dit.sample`: sample a trained (or converted) DiT to a PNG grid or an .npz of images.

  python -m dit.sample --config=configs/digits.py --workdir=runs/digits --num=100 \
      --out=grid.png [--sampler=ddim --steps=50 --cfg_scale=4.0 --seed=0]
  python -m dit.sample --config=configs/t2i_pixart.py --workdir=runs/t2i \
      --prompt="a handwritten digit seven" [--prompt="the number 3" ...] --num=16
  python -m dit.sample --workdir=DIR    # config from DIR/config.json (dit.train, convert)

Text-to-image runs the whole pipeline: prompt -> T5 (config.text.t5_path; "" = the offline
demo encoder) -> DiT sampler with classifier-free guidance -> VAE decode (config.vae.path;
"" = pixel space) -> PNG. An empty prompt means the model's null caption. The library
behind it is dit/generate.py.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from dit import checkpoint, generate
from dit.cli import UserError, run_command

# ---- Command line ----------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a command (modules import cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  flags.DEFINE_string("workdir", None, "Workdir holding ckpt/ (and config.json).")
  flags.DEFINE_integer("num", 64, "Number of samples.")
  flags.DEFINE_string("out", "grid.png", "Output: .png grid or .npz array (uint8 images).")
  flags.DEFINE_string("sampler", None, "Sampler name; default config.sample.sampler.")
  flags.DEFINE_integer("steps", None, "Sampling steps; default config.sample.steps.")
  flags.DEFINE_float("cfg_scale", None, "Guidance scale; default config.sample.cfg_scale.")
  flags.DEFINE_integer("seed", 0, "PRNG seed.")
  flags.DEFINE_list("labels", None, "Class labels (default: equal rows of all classes).")
  flags.DEFINE_bool("raw_params", False, "Use the raw instead of the EMA parameters.")
  flags.DEFINE_multi_string(
    "prompt", None, "Text prompt (repeat for several; one row each); '' = the null caption."
  )
  flags.DEFINE_string("t5", None, "Overrides config.text.t5_path (a local T5 directory).")
  flags.DEFINE_string("vae", None, "Overrides config.vae.path (a diffusers VAE directory).")


def _with_model_dirs(config: ml_collections.ConfigDict, t5: str | None, vae: str | None):
  """config with --t5 / --vae applied (adding the sections if the config lacks them)."""
  if t5 is None and vae is None:
    return config
  config = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  if t5 is not None:
    if "text" not in config:
      config.text = ml_collections.ConfigDict()
    config.text.t5_path = t5
  if vae is not None:
    if "vae" not in config:
      config.vae = ml_collections.ConfigDict()
    config.vae.path = vae
  config.lock()
  return config


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None:
    raise UserError("--workdir is required.")
  config = FLAGS.config if FLAGS.config is not None else checkpoint.read_config(FLAGS.workdir)
  config = _with_model_dirs(config, FLAGS.t5, FLAGS.vae)
  if FLAGS.num < 1:
    raise UserError(f"--num must be positive, got {FLAGS.num}.")
  # Before the (slow) checkpoint restore: guidance, eta, steps and the model directories.
  generate.check_sample_config(config, cfg_scale=FLAGS.cfg_scale)
  generate.sampler_settings(config, sampler=FLAGS.sampler, steps=FLAGS.steps)
  generate.check_model_dirs(config)
  model, params = generate.load_params(config, FLAGS.workdir, use_ema=not FLAGS.raw_params)
  cond, per_row = generate.sample_cond(config, FLAGS.num, FLAGS.prompt, FLAGS.labels)
  images = generate.generate(
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
  images = generate.decode(config, images)
  out = FLAGS.out
  if out.endswith(".npz"):
    np.savez(out, images=generate.to_uint8(images))
  else:
    generate.save_grid(images, out, nrow=per_row)
  print(f"wrote {out}")


def cli() -> None:
  """Console-script entry point (`dit-sample`)."""
  define_flags()
  run_command(main)


if __name__ == "__main__":
  cli()
