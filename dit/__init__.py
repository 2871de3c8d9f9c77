"""dit: diffusion transformers (DiT, PixArt, SiT) in pure JAX/Flax.

The public entry points, imported on first use (so `import dit` stays cheap):

  config = dit.load_config("configs/digits.py")            # a config file, locked
  config = dit.apply_overrides(config, {"sample.steps": 20})  # a copy with dotted overrides
  config, model, params = dit.load("runs/digits")           # a workdir: config.json, EMA params

and the library modules, `dit.generate` (conditioning, sampling, editing, decoding, grids),
`dit.evaluation` (metrics), `dit.checkpoint` (workdirs), `dit.cli` (configs, UserError). The
commands are `dit.train` (also `train.train_and_evaluate`), `dit.sample`, `dit.evaluate` and
`dit.info`; import them as `from dit import train`. docs/api.md has the common tasks.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it.
_FUNCTIONS = {"load_config": "dit.cli", "apply_overrides": "dit.cli", "load": "dit.generate"}
_MODULES = ("generate", "evaluation", "checkpoint", "cli")

__all__ = [*_FUNCTIONS, *_MODULES]


def __getattr__(name: str):
  if name in _FUNCTIONS:
    return getattr(importlib.import_module(_FUNCTIONS[name]), name)
  if name in _MODULES:  # As `import dit.generate` would (and then sets the attribute).
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module 'dit' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
