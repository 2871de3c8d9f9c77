"""The shape of dit, read with `ast` (nothing imported): two layers, no cycles, short functions.

Layers: the commands are COMMANDS (flags, `main`, calls into the library); every other module
under dit/ is library, including modules with a `main` of their own (dit.models.convert,
dit.data.precompute, dit.fid_stats). No module imports a command: the library never imports
upward, and a command never imports another command (what two commands share belongs in the
library). Every import counts: module level and inside functions. The import graph of dit
modules has no cycles either (lazy imports included: a lazy import that dodges a cycle is
still a cycle). Functions stay under MAX_FUNCTION_LINES lines.
"""

import ast
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dit"
COMMANDS = frozenset({"dit.train", "dit.sample", "dit.evaluate", "dit.info"})
MAX_FUNCTION_LINES = 80
# Functions that may be long: config builders (`get_config`) and data tables, functions whose
# body (after the docstring) only returns or assigns literals (a dict of names, a table).
LONG_FUNCTIONS_ALLOWED = frozenset({"get_config"})

Graph = dict[str, dict[str, int]]  # importer -> {imported module: line of the first import}


def module_names(root: Path) -> dict[str, Path]:
  """{dotted module name: file} of the package at `root` (its directory name is the package)."""
  names = {}
  for path in sorted(root.rglob("*.py")):
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
      parts = parts[:-1]
    names[".".join(parts)] = path
  return names


def _resolve(name: str, modules: Iterable[str]) -> str | None:
  """The module `name` names, or the nearest enclosing module (`a.b.func` -> `a.b`)."""
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def _imported_modules(
  node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: Iterable[str]
) -> list[str]:
  """The package modules an import statement imports: `from a import b` is a.b if that is a
  module, else a (its __init__); `import a.b` is a.b only (not the packages above it)."""
  if isinstance(node, ast.Import):
    names = [_resolve(alias.name, modules) for alias in node.names]
    return [n for n in names if n]
  base = node.module or ""
  if node.level:  # Relative: from the importer's package, `level - 1` packages up.
    package = importer if is_package else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
      package = package.rpartition(".")[0]
    base = f"{package}.{base}" if base else package
  out = []
  for alias in node.names:
    full = f"{base}.{alias.name}"
    target = full if full in modules else _resolve(base, modules)
    if target:
      out.append(target)
  return out


def import_graph(root: Path) -> Graph:
  """Edges between the modules of the package at `root`, every import statement counted."""
  modules = module_names(root)
  graph: Graph = {}
  for name, path in modules.items():
    edges = graph.setdefault(name, {})
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if isinstance(node, ast.Import | ast.ImportFrom):
        is_package = path.name == "__init__.py"
        for target in _imported_modules(node, name, is_package, modules):
          if target != name:
            edges[target] = min(edges.get(target, node.lineno), node.lineno)
  return graph


def layer_violations(graph: Graph, commands: Iterable[str] = COMMANDS) -> list[str]:
  """One line per import of a command module by any other module (library or command)."""
  commands = set(commands)
  out = []
  for importer, edges in sorted(graph.items()):
    for imported, line in sorted(edges.items()):
      if imported in commands:
        kind = "command" if importer in commands else "library module"
        out.append(f"{kind} {importer} -> command {imported} (line {line})")
  return out


def tangles(graph: Graph) -> list[set[str]]:
  """The strongly connected components of more than one module (each holds a cycle)."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def connect(v):  # Tarjan's algorithm (the graph is small: recursion is fine).
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, {}):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(set(component))

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return sorted(components, key=min)


def import_cycles(graph: Graph) -> list[list[str]]:
  """One cycle [a, b, ..., a] per tangle: a shortest one through its first module (by name)."""
  return [_cycle_in(graph, component) for component in tangles(graph)]


def cycle_report(graph: Graph) -> list[str]:
  """One line per tangle: a cycle "a -> b -> a", then the tangle's other modules if any."""
  lines = []
  for component in tangles(graph):
    cycle = _cycle_in(graph, component)
    others = sorted(component - set(cycle))
    more = f"  (the same tangle also holds {', '.join(others)})" if others else ""
    lines.append(" -> ".join(cycle) + more)
  return lines


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
  """A shortest cycle through the first module (by name) of a strongly connected component."""
  start = min(component)
  paths, seen = [[start]], {start}
  while paths:  # Breadth first, inside the component, back to `start`.
    path = paths.pop(0)
    for w in sorted(graph.get(path[-1], {})):
      if w == start:
        return [*path, start]
      if w in component and w not in seen:
        seen.add(w)
        paths.append([*path, w])
  raise AssertionError(f"no cycle in component {sorted(component)}")


def _is_data_table(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
  body = node.body
  if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
    body = body[1:]  # The docstring.

  def literal(value):
    try:
      ast.literal_eval(value)
    except ValueError:
      return False
    return True

  return bool(body) and all(
    isinstance(s, ast.Return | ast.Assign | ast.AnnAssign) and s.value and literal(s.value)
    for s in body
  )


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
  """("path:line name", lines) of each function over `limit` lines (def to last line)."""
  out = []
  for path in sorted(root.rglob("*.py")):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        continue
      lines = node.end_lineno - node.lineno + 1
      allowed = node.name in LONG_FUNCTIONS_ALLOWED or _is_data_table(node)
      if lines > limit and not allowed:
        where = path.relative_to(root.parent).as_posix()
        out.append((f"{where}:{node.lineno} {node.name}", lines))
  return sorted(out)


# ---- The package --------------------------------------------------------------------------


def test_commands_exist():
  modules = module_names(PACKAGE)
  assert COMMANDS <= set(modules), sorted(COMMANDS - set(modules))


def test_no_module_imports_a_command():
  violations = layer_violations(import_graph(PACKAGE))
  assert not violations, (
    "Only the commands' own files may hold command code: move what is shared into a library "
    "module (importer -> imported):\n  " + "\n  ".join(violations)
  )


def test_no_import_cycles():
  lines = cycle_report(import_graph(PACKAGE))
  assert not lines, "Import cycles among dit modules (lazy imports too):\n  " + "\n  ".join(lines)


def test_functions_are_short():
  long = long_functions(PACKAGE)
  assert not long, f"Functions over {MAX_FUNCTION_LINES} lines (split them):\n  " + "\n  ".join(
    f"{where} ({n} lines)" for where, n in long
  )


# ---- The checker itself, on seeded violations ----------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_on_a_synthetic_package(tmp_path):
  root = tmp_path / "pkg"
  _write(
    root,
    {
      "__init__.py": "",
      "run.py": "from pkg import lib\nfrom pkg.util import helper\n",  # A command: fine.
      "other.py": "import pkg.run\n",  # A command importing a command.
      "lib.py": "def f():\n  from pkg import run  # Lazy, still counted.\n",
      "util.py": "def helper():\n  pass\n",
      "sub/__init__.py": "from .a import x\n",
      "sub/a.py": "from . import b\nx = 1\n",  # a -> b -> a, one of them relative.
      "sub/b.py": "def g():\n  from pkg.sub import a\n",
      "sub/c.py": "from ..util import helper\nimport os, pkg.sub.b\n",  # No cycle: c -> b only.
    },
  )
  graph = import_graph(root)
  assert graph["pkg.run"] == {"pkg.lib": 1, "pkg.util": 2}
  assert graph["pkg.sub"] == {"pkg.sub.a": 1}
  assert graph["pkg.sub.c"] == {"pkg.util": 1, "pkg.sub.b": 2}
  assert layer_violations(graph, {"pkg.run", "pkg.other"}) == [
    "library module pkg.lib -> command pkg.run (line 2)",
    "command pkg.other -> command pkg.run (line 1)",
  ]
  # lib -> run -> lib is a cycle too, and sub.a <-> sub.b.
  assert import_cycles(graph) == [
    ["pkg.lib", "pkg.run", "pkg.lib"],
    ["pkg.sub.a", "pkg.sub.b", "pkg.sub.a"],
  ]
  _write(root, {"util.py": "import pkg.lib\n"})  # lib -> run -> util -> lib: one tangle.
  assert cycle_report(import_graph(root)) == [
    "pkg.lib -> pkg.run -> pkg.lib  (the same tangle also holds pkg.util)",
    "pkg.sub.a -> pkg.sub.b -> pkg.sub.a",
  ]
  # Long functions: 81 lines fails; a long data table and a long get_config do not.
  table = "def t():\n  return {\n" + "    'a': 1,\n" * 90 + "  }\n"
  get_config = "def get_config():\n" + "  print(1)\n" * 90
  _write(root, {"long.py": "def f():\n" + "  print(1)\n" * 80, "t.py": table, "c.py": get_config})
  assert long_functions(root) == [("pkg/long.py:1 f", 81)]
  assert long_functions(root, limit=81) == []


def test_checker_catches_violations_seeded_into_a_copy_of_dit(tmp_path):
  copy = tmp_path / "dit"
  shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
  before = import_graph(copy)
  violations, cycles = set(layer_violations(before)), import_cycles(before)

  # A library module importing a command lazily, and a new cycle digits <-> preprocess (two
  # modules that import no other dit module, so the cycle is exactly these two).
  def append(name, text):
    (copy / name).write_text((copy / name).read_text() + text)

  append("hardware.py", "\n\ndef _f():\n  import dit.train\n")
  append("data/digits.py", "\nfrom dit.data import preprocess\n")
  append("data/preprocess.py", "\n\ndef _g():\n  from dit.data.digits import DigitsSource\n")
  after = import_graph(copy)
  (new,) = set(layer_violations(after)) - violations
  assert new.startswith("library module dit.hardware -> command dit.train (line ")
  cycle = ["dit.data.digits", "dit.data.preprocess", "dit.data.digits"]
  assert cycle in import_cycles(after) and cycle not in cycles
  assert "dit.data.digits -> dit.data.preprocess -> dit.data.digits" in cycle_report(after)


@pytest.mark.parametrize("module", ["dit.models.convert", "dit.data.precompute", "dit.fid_stats"])
def test_modules_with_a_main_are_library_modules(module):
  assert module in module_names(PACKAGE) and module not in COMMANDS
