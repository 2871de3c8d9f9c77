"""`dit.evaluate`: sample from a checkpoint, compute metrics, write `eval.json`.

  python -m dit.evaluate --config=configs/digits.py --workdir=runs/digits

The metrics (config.eval.metric: "digits" or "fid") are computed by dit/evaluation.py.
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags
from ml_collections import config_flags

from dit import evaluation, generate
from dit.cli import UserError, run_command

# ---- Command line ----------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  flags.DEFINE_string("workdir", None, "Training workdir holding ckpt/; eval.json goes here.")
  flags.DEFINE_integer("seed", 0, "PRNG seed for the samples.")
  flags.DEFINE_bool("raw_params", False, "Evaluate the raw instead of the EMA parameters.")


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise UserError("--config and --workdir are required.")
  config = FLAGS.config
  evaluation.check_eval_config(config)  # Before the (slow) checkpoint restore.
  model, params = generate.load_params(config, FLAGS.workdir, use_ema=not FLAGS.raw_params)
  result = evaluation.evaluate(config, model, params, jax.random.PRNGKey(FLAGS.seed))
  result.update(
    sampler=config.sample.sampler, steps=config.sample.steps, cfg_scale=config.sample.cfg_scale
  )
  path = os.path.join(FLAGS.workdir, "eval.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if not k.startswith("accuracy_class")}))


def cli() -> None:
  """Console-script entry point (`dit-evaluate`)."""
  define_flags()
  run_command(main)


if __name__ == "__main__":
  cli()
