"""`dit.info` (dit-info): parameter count and FLOPs of a config's model, nothing allocated.

  dit-info --config=configs/imagenet256_dit.py:XL/2
  dit-info --workdir=runs/digits                     # the model of its config.json
  dit-info --config=configs/digits.py --config.model.depth=8
  dit-info --config=configs/imagenet256_dit.py:lightningdit   # RMSNorm, SwiGLU, RoPE blocks

prints one JSON object: params, fixed_params, gmacs_fwd, gflops_fwd, gflops_train, tokens,
input_shape, output_shape, dtype (see dit.models.flops.model_info, which this command wraps;
every block option is counted as it runs, RoPE's elementwise rotation aside).
"""

from __future__ import annotations

import json

from absl import flags

from dit import checkpoint
from dit import cli as cli_lib
from dit.cli import UserError, run_command
from dit.models.dit import build_model
from dit.models.flops import model_info

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  cli_lib.define_config_flags(flag_values, "A run whose config.json to describe (or --config).")


def main(argv):
  del argv
  if FLAGS.config is None and FLAGS.workdir is None:
    raise UserError("--config is required, e.g. --config=configs/imagenet256_dit.py:XL/2")
  config, _ = checkpoint.command_config(FLAGS.workdir, FLAGS.config, cli_lib.workdir_overrides())
  if FLAGS.config_keys:
    print(cli_lib.config_keys_text(config))
    return
  try:
    model = build_model(config.model)
  except ValueError as e:
    raise UserError(f"Bad config.model: {e}") from e
  print(json.dumps(model_info(model), indent=2))


def cli():
  """Console-script entry point (`dit-info`)."""
  run_command(main, define_flags, __doc__)


if __name__ == "__main__":
  cli()
