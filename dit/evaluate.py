"""`dit.evaluate` (dit-evaluate): sample from a checkpoint, compute metrics, write `eval.json`.

  dit-evaluate --workdir=runs/digits                                  # with its config.json
  dit-evaluate --workdir=runs/digits --config.eval.num_samples=200 --config.sample.steps=20
  dit-evaluate --config=configs/digits.py --workdir=runs/digits

The metrics (config.eval.metric) are computed by dit/evaluation.py: "digits" (conditional
accuracy and a Frechet distance in a digits classifier's features), "fid" (FID and
Inception Score; config.eval.inception_path and config.eval.ref_stats) or "fd_dinov2"
(EDM2's FD-DINOv2; config.eval.dinov2_path and config.eval.dinov2_ref_stats), or a
comma-separated list of them ("fid,fd_dinov2"). WORKDIR/eval.json records them with the
sampler settings and the config keys that differ from config.json.
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags

from dit import checkpoint, evaluation, generate
from dit import cli as cli_lib
from dit.cli import UserError, run_command

# ---- Command line ----------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  cli_lib.define_config_flags(flag_values, "Training workdir holding ckpt/; eval.json goes here.")
  flags.DEFINE_integer("seed", 0, "PRNG seed for the samples.", flag_values=flag_values)
  flags.DEFINE_bool(
    "raw_params", False, "Evaluate the raw instead of the EMA parameters.", flag_values=flag_values
  )
  flags.DEFINE_bool(
    "progress", True, "A tqdm bar with ETA over the sampling (--noprogress for logs).",
    flag_values=flag_values,
  )  # fmt: skip


def help_notes() -> str:
  keys = ("eval.metric", "sample.sampler (diffusion)", "sample.sampler (flow)")
  return evaluation.choices_text(keys)


def check_writable(path: str) -> None:
  """UserError now, not after the sampling, if the file `path` cannot be written."""
  existed = os.path.exists(path)
  try:
    with open(path, "a"):
      pass
  except OSError as e:
    raise UserError(f"{path} cannot be written ({e.strerror}).") from e
  if not existed:
    os.remove(path)


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None:
    raise UserError("--workdir is required (it holds the checkpoints; eval.json goes there).")
  config, changes = checkpoint.command_config(
    FLAGS.workdir, FLAGS.config, cli_lib.workdir_overrides(), fixed=("model", "diffusion", "flow")
  )
  if FLAGS.config_keys:
    print(cli_lib.config_keys_text(config))
    return
  path = os.path.join(FLAGS.workdir, "eval.json")
  # Before the (slow) checkpoint restore and sampling.
  evaluation.check_eval_config(config)
  check_writable(path)
  model, params = generate.load_params(config, FLAGS.workdir, use_ema=not FLAGS.raw_params)
  key = jax.random.PRNGKey(FLAGS.seed)
  result = evaluation.evaluate(config, model, params, key, progress=FLAGS.progress)
  result.update(
    sampler=config.sample.sampler, steps=config.sample.steps, cfg_scale=config.sample.cfg_scale
  )
  if changes:  # What this evaluation's config changed from the run's config.json.
    result["config_changes"] = {key: [old, new] for key, old, new in changes}
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if not k.startswith("accuracy_class")}))


def cli() -> None:
  """Console-script entry point (`dit-evaluate`)."""
  run_command(main, define_flags, __doc__, help_notes)


if __name__ == "__main__":
  cli()
