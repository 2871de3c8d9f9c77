"""Parameter count and FLOPs of a config's model, without allocating or running it.

  python -m dit.info --config=configs/imagenet256_dit.py:XL/2

prints one JSON object: params, fixed_params, gmacs_fwd, gflops_fwd, gflops_train, tokens,
input_shape, output_shape, dtype (see dit.models.flops.model_info, which this command wraps).
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from dit.cli import UserError, run_command
from dit.models.dit import build_model
from dit.models.flops import model_info


def main(argv):
  del argv
  config = flags.FLAGS.config
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/imagenet256_dit.py:XL/2")
  print(json.dumps(model_info(build_model(config.model)), indent=2))


def cli():
  """Console-script entry point (`dit-info`)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  run_command(main)


if __name__ == "__main__":
  cli()
