"""Command-line plumbing shared by the `dit.*` commands: flags, clean errors.

Configs come from `--config=configs/x.py[:arg]` with `--config.key=value` overrides
(ml_collections config_flags). A bad flag or a user error ends the program with one
line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags, logging


class UserError(Exception):
  """An error in the user's input (config, paths, arguments): shown as one line."""


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` by calling its `get_config(arg)`; the result is locked."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_dit_config", path)
  if module_spec is None or module_spec.loader is None:
    raise UserError(f"Config file {path!r} could not be loaded (expected a .py file).")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except FileNotFoundError as e:
    raise UserError(f"Config file {path!r} does not exist.") from e
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"Config {spec!r}: {e}") from e
  config.lock()
  return config


def config_diffs(old: dict, new: dict, sections, ignore=()) -> list[tuple[str, object, object]]:
  """(dotted key, old value, new value) for every leaf of `sections` that differs.

  old, new: configs as plain dicts (e.g. two config.json files); keys in `ignore` (dotted,
  like "model.dtype") are skipped.
  """
  diffs = []

  def walk(a, b, prefix):
    if prefix in ignore:
      return
    if isinstance(a, dict) and isinstance(b, dict):
      for k in sorted(set(a) | set(b)):
        walk(a.get(k), b.get(k), f"{prefix}.{k}")
    elif a != b:
      diffs.append((prefix, a, b))

  for section in sections:
    walk(old.get(section), new.get(section), section)
  return diffs


def unknown_config_key(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """Returns a message if `dotted` (e.g. "model.depth") is not a key of `config`."""
  node, walked = config, []
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(walked) or "config"
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      return f"Unknown config key {dotted!r}: {where!r} has keys {valid}."
    node, walked = node[part], [*walked, part]
  return None


def _explain_flag_error(argv: Sequence[str], error: Exception) -> str:
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is not None:
    try:
      config = load_config(spec)
    except UserError as e:
      return str(e)
    for arg in argv:
      if arg.startswith("--config."):
        message = unknown_config_key(config, arg[len("--config.") :].split("=", 1)[0])
        if message:
          return message
  return str(error).strip()


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl and config_flags raise many types; explain them all.
    print(f"error: {_explain_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def run_command(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run` with one-line errors for bad flags and `UserError`s."""

  def wrapped(argv):
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
      logging.set_verbosity(logging.WARNING)  # Keep the console for the progress bar.
    try:
      main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped, flags_parser=_parse_flags)
