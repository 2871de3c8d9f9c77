"""Command-line plumbing shared by the `dit.*` commands: flags, configs, help, clean errors.

Configs come from `--config=configs/x.py[:arg]` with `--config.key=value` overrides
(ml_collections config_flags), or, without --config, from the workdir's config.json with the
same `--config.key=value` overrides (`workdir_overrides`, applied by the command). A bad flag
or a user error ends the program with one line on stderr and exit code 2, not a traceback;
non-finite numbers that stop a command (a diverged run) end it with one line and exit code 3.
`-h` / `--help` prints the command's own flags (with defaults) and exits 0; `--helpfull`
adds the libraries' flags. `--config_keys` prints every key of the config and exits 0.

Scripts that build configs themselves (experiments/, benchmarks/) use the same two
builders: `load_config("path.py[:arg]")` and `apply_overrides(config, ["a.b=1", ...])`.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import os
import sys
import textwrap
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

# "dotted.key=value" strings, or {dotted key: value} (values taken as they are).
Overrides = Sequence[str] | Mapping[str, Any]


class UserError(Exception):
  """An error in the user's input (config, paths, arguments): shown as one line."""


def _one_line(error: Exception) -> str:
  """`error` as one line; the type is named unless it is a ValueError or UserError."""
  text = " ".join(str(error).split())
  if isinstance(error, UserError | ValueError):
    return text
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_config_module(path: str) -> types.ModuleType:
  """Executes the config file `path` (.py) and returns it as a (not imported) module.

  Raises UserError naming `path` when the file is missing, is not Python, has a syntax
  error or raises anything while it is executed.
  """
  if not os.path.isfile(path):
    what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
    raise UserError(f"Config file {path!r} {what}.")
  module_spec = importlib.util.spec_from_file_location("_dit_config", path)
  if module_spec is None or module_spec.loader is None:
    raise UserError(f"Config file {path!r} could not be loaded (expected a .py file).")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    where = "" if e.filename in (None, path) else f" (in {e.filename})"
    raise UserError(f"Config file {path!r}: syntax error{where} at line {e.lineno}: {e.msg}") from e
  except Exception as e:  # Whatever a config file raises, name the file in one line.
    raise UserError(f"Config file {path!r} failed to load: {_one_line(e)}") from e
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` by calling its `get_config(arg)`; the result is locked.

  Every failure (missing file, syntax error, an exception in the file or in get_config)
  is a one-line UserError naming the file or the spec.
  """
  path, _, arg = spec.partition(":")
  module = load_config_module(path)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UserError(f"Config file {path!r} defines no get_config() function.")
  try:
    config = get_config(arg) if arg else get_config()
  except Exception as e:
    raise UserError(f"Config {spec!r}: {_one_line(e)}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    kind = type(config).__name__
    raise UserError(f"Config {spec!r}: get_config() returned a {kind}, not a ConfigDict.")
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


def unknown_config_key(
  config: ml_collections.ConfigDict, dotted: str, extra: Sequence[str] = ()
) -> str | None:
  """Returns a message if `dotted` (e.g. "model.depth") is not a key of `config`.

  extra: dotted keys that are valid too although `config` lacks them (e.g. fields with
  a default); they are listed with the keys of their level.
  """
  node, walked = config, []
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    where = ".".join(walked)
    if not isinstance(node, ml_collections.ConfigDict):
      return f"Unknown config key {dotted!r}: {where!r} is a value, not a section."
    more = {k.rpartition(".")[2] for k in extra if k.rpartition(".")[0] == where}
    if part not in node:
      if part in more and i == len(parts) - 1:
        return None
      valid = sorted({*node.keys(), *more})
      return f"Unknown config key {dotted!r}: {where or 'config'!r} has keys {valid}."
    node, walked = node[part], [*walked, part]
  return None


def _split_overrides(overrides: Overrides) -> list[tuple[str, Any, bool]]:
  """(dotted key, value, value is command-line text) for each override."""
  if isinstance(overrides, Mapping):
    return [(key, value, False) for key, value in overrides.items()]
  if isinstance(overrides, str):
    raise TypeError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
  items = []
  for item in overrides:
    key, sep, value = str(item).partition("=")
    if not sep or not key.strip():
      raise UserError(f"Override {item!r} is not of the form key=value (e.g. model.depth=2).")
    items.append((key.strip(), value.strip(), True))
  return items


def _current_value(config: ml_collections.ConfigDict, key: str, defaults: Mapping[str, Any]):
  """The value `key` has in `config` (or its default): its type is the one expected."""
  node = config
  parts = key.split(".")
  for i, part in enumerate(parts):
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      node = node[part]
    elif isinstance(node, ml_collections.ConfigDict) and key in defaults and i == len(parts) - 1:
      return defaults[key]
    else:
      raise UserError(unknown_config_key(config, key, list(defaults)))
  if isinstance(node, ml_collections.ConfigDict):
    raise UserError(f"Config key {key!r} is a section, not a value; set its keys {sorted(node)}.")
  return node


def _parse_text(text: str, kind: type) -> Any:
  """Command-line text -> a Python literal where it is one (a str field keeps the text)."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    value = text
  if kind is str:
    return value if isinstance(value, str) else text
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  if text.lower() in ("none", "null"):
    return None
  if kind is float and isinstance(value, str):
    try:
      return float(text)  # "inf", "nan".
    except ValueError:
      pass
  return value


def _coerce(key: str, value: Any, current: Any) -> Any:
  """`value` as the type of `current` (None takes anything); UserError if it is not one."""
  if current is None:
    return value
  kind = type(current)
  number = isinstance(value, int | float) and not isinstance(value, bool)
  if kind is float and number:
    return float(value)
  if kind in (tuple, list) and isinstance(value, tuple | list):
    return kind(value)
  ok = number and isinstance(value, int) if kind is int else isinstance(value, kind)
  if not ok:
    expected = f"a value of type {kind.__name__} (its value is {current!r})"
    raise UserError(f"Config key {key!r} takes {expected}, got {value!r}.")
  return value


def parse_overrides(
  config: ml_collections.ConfigDict,
  overrides: Overrides,
  *,
  defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """{dotted key: value} of `overrides`, each checked against `config` (nothing is set).

  Args:
    config: the config the overrides are for.
    overrides: "dotted.key=value" strings, whose values are parsed as Python literals (ints,
      floats, bools (also true/false), None, strings, tuples, lists) where the key's type is
      not str (a str key takes the text as it is); or a dict {dotted key: value}.
    defaults: {dotted key: default} of keys `config` may lack (the default gives the type).

  Raises:
    UserError: an item is not key=value; a key is unknown (the message lists the valid keys
      of its level) or a section; a value is not of the key's type (int -> float is fine).
  """
  defaults = dict(defaults or {})
  values = {}
  for key, value, is_text in _split_overrides(overrides):
    current = _current_value(config, key, defaults)
    if is_text:
      value = _parse_text(value, type(current))
    values[key] = _coerce(key, value, current)
  return values


def apply_overrides(
  config: ml_collections.ConfigDict,
  overrides: Overrides,
  *,
  defaults: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
  """A locked copy of `config` with `overrides` (see `parse_overrides`) set; `config` is kept.

  A key of `defaults` that `config` lacks is added to its section.
  """
  values = parse_overrides(config, overrides, defaults=defaults)
  config = copy.deepcopy(config)
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      if leaf in node:
        node[leaf] = value
      else:
        with node.unlocked():
          node[leaf] = value
    except TypeError as e:  # ml_collections' own check (e.g. a typed placeholder).
      raise UserError(f"Config key {key!r}: {_one_line(e)}") from e
  config.lock()
  return config


# ---- Commands: the shared flags, help, --config_keys -------------------------------------

HELP_ARGS = ("-h", "--help", "-help", "--helpshort")
# --config.KEY=VALUE given without --config: overrides of the workdir's config.json.
_workdir_overrides: list[str] = []


def define_config_flags(
  flag_values: flags.FlagValues = flags.FLAGS, workdir_help: str = "The run's directory."
) -> None:
  """--config, --workdir and --config_keys: the flags every command shares."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, configs/NAME.py[:ARG]; default: WORKDIR/config.json (the run's own). Set any "
    "key with --config.KEY=VALUE (also without --config: then on WORKDIR/config.json).",
    flag_values=flag_values,
  )
  flags.DEFINE_string("workdir", None, workdir_help, flag_values=flag_values)
  flags.DEFINE_bool(
    "config_keys",
    False,
    "Print every config key (of --config, else WORKDIR/config.json) with its value, and exit.",
    flag_values=flag_values,
  )


def workdir_overrides() -> list[str]:
  """The "key=value" overrides given as --config.KEY=VALUE without --config (for config.json)."""
  return list(_workdir_overrides)


def _take_workdir_overrides(argv: list[str]) -> list[str]:
  """argv without its --config.KEY=VALUE items when no --config is given (they are kept in
  `workdir_overrides`); config_flags handles them itself when --config is given."""
  _workdir_overrides.clear()
  if any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    return argv
  rest = [argv[0]]
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":  # Positional arguments follow.
      return rest + argv[i:]
    if arg.startswith("--config."):
      key, sep, value = arg[len("--config.") :].partition("=")
      _workdir_overrides.append(f"{key}={value if sep else 'True'}")
    else:
      rest.append(arg)
  return rest


def config_keys_text(config: ml_collections.ConfigDict, source: str = "") -> str:
  """Every leaf of `config` as "dotted.key = value", one per line (for --config_keys)."""
  lines = [f"# config keys{f' of {source}' if source else ''}; set any with --config.KEY=VALUE"]

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f"{prefix}{key}.")
      else:
        lines.append(f"{prefix}{key} = {value!r}")

  walk(config, "")
  return "\n".join(lines)


def _flag_line(flag) -> str:
  """One flag of a help text: its name, its value's form and its default, then its help."""
  kind = flag.flag_type()
  if isinstance(flag, flags.BooleanFlag):
    name = f"--[no]{flag.name}"
  else:
    form = {"int": "INT", "float": "FLOAT", "multi string": "TEXT (repeatable)"}.get(kind)
    name = f"--{flag.name}={form or ('A,B,...' if 'list' in kind else 'TEXT')}"
  default = flag.default
  if flag.name == "config":
    default = "WORKDIR/config.json"
  elif default is None:
    default = "none"
  elif isinstance(default, bool):
    default = str(default).lower()
  elif isinstance(default, list):
    default = ",".join(map(str, default))
  text = f"{flag.help.split(';' + chr(10))[0]} (default: {default})"
  body = textwrap.fill(text, 96, initial_indent="      ", subsequent_indent="      ")
  return f"  {name}\n{body}"


def help_text(
  doc: str, flag_values: flags.FlagValues, names: Sequence[str], notes: str = ""
) -> str:
  """A command's --help: its docstring, its own flags (`names`) with defaults, `notes`."""
  flag_lines = [_flag_line(flag_values[n]) for n in names if n in flag_values]
  parts = [doc.strip(), "Flags:\n" + "\n".join(flag_lines)]
  if notes:
    parts.append(notes.strip())
  footer = (
    "Config keys: --config_keys prints every key of the config (of --config, else "
    "WORKDIR/config.json) with its value; --config.KEY=VALUE sets one. The libraries' own "
    "flags (absl, ...): --helpfull."
  )
  parts.append(textwrap.fill(footer, 100))
  return "\n\n".join(parts) + "\n"


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


def parse_flags(
  argv: list[str],
  flag_values: flags.FlagValues = flags.FLAGS,
  help: Callable[[], str] | None = None,
) -> list[str]:
  """Parses `argv` into `flag_values` (the commands' flags_parser): prints `help()` and exits
  0 for -h/--help; a bad flag or config is one line on stderr and exit 2."""
  if help is not None and any(a in HELP_ARGS for a in argv[1:]):
    print(help(), end="")
    sys.exit(0)
  if help is not None and "--helpfull" in argv[1:]:  # Every flag, the libraries' too.
    print(flag_values.get_help())
    sys.exit(0)
  try:
    rest = flag_values(_take_workdir_overrides(list(argv)))
    config = flag_values["config"].value if "config" in flag_values else None
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
      # config_flags defers a failed load (e.g. a missing file) to the first read of a field.
      raise ValueError(f"--config could not be loaded: {type(config).__name__}")
    return rest
  except Exception as e:  # absl and config_flags raise many types; explain them all.
    print(f"error: {_explain_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def _ignore_abandoned_orbax_reads(unraisable) -> None:
  """sys.unraisablehook: drops the "Exception ignored in <coroutine ...>" tracebacks of the
  array reads Orbax leaves behind when a damaged checkpoint fails to restore (the failure
  itself is reported, once, by dit.checkpoint); everything else goes to the default hook."""
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    logging.info("Ignored an abandoned Orbax read: %r", unraisable.exc_value)
    return
  sys.__unraisablehook__(unraisable)


def call_main(main: Callable[[list[str]], None], argv: list[str]) -> None:
  """main(argv) with one-line errors: a `UserError` exits with 2, a FloatingPointError (a run
  that diverged, non-finite samples) with 3."""
  try:
    main(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(3)


def run_command(
  main: Callable[[list[str]], None],
  define_flags: Callable[[], None] | None = None,
  doc: str = "",
  notes: Callable[[], str] | None = None,
) -> None:
  """`absl.app.run` of `main` with one-line errors (`call_main`) and, given the command's
  `define_flags`, a --help of the flags it defines (`doc` first, then `notes()`)."""
  help = None
  if define_flags is not None:
    before = set(flags.FLAGS)
    define_flags()
    own = [name for name in flags.FLAGS if name not in before]
    help = lambda: help_text(doc, flags.FLAGS, own, notes() if notes else "")

  def wrapped(argv):
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
      logging.set_verbosity(logging.WARNING)  # Keep the console for the progress bar.
    sys.unraisablehook = _ignore_abandoned_orbax_reads
    call_main(main, argv)

  app.run(wrapped, flags_parser=functools.partial(parse_flags, help=help))
