"""docs/api.md: its Python snippets run, in order, in one namespace, as written.

They run in a directory holding `digits_demo/`: a tiny random digits model written as step 0
of a workdir (the page's workdir is the README demo's), so the five tasks (load, sample,
edit, evaluate, sweep) take seconds.
"""

import re

import pytest
from conftest import ROOT
from test_early_checks import write_tiny_workdir

PAGE = ROOT / "docs" / "api.md"
TASKS = ("1. Load", "2. Sample", "3. Edit", "4. Evaluate", "5. Sweep")


def snippets() -> list[tuple[str, str]]:
  """(section title, code) of every ```python block of the page, in order."""
  text = PAGE.read_text()
  out = []
  for section in re.split(r"^## ", text, flags=re.M)[1:]:
    title = section.splitlines()[0]
    out += [(title, code) for code in re.findall(r"```python\n(.*?)```", section, re.S)]
  return out


def test_the_page_has_a_snippet_per_task():
  titles = [title for title, _ in snippets()]
  for task in TASKS:
    assert any(title.startswith(task) for title in titles), (task, titles)


def test_the_snippets_run(tmp_path, monkeypatch, capsys):
  write_tiny_workdir(tmp_path / "digits_demo", **{"diffusion.prediction": "v"})
  monkeypatch.chdir(tmp_path)
  namespace = {}
  for title, code in snippets():
    try:
      exec(compile(code, f"{PAGE}: {title}", "exec"), namespace)
    except Exception as e:
      pytest.fail(f"docs/api.md, section {title!r}: {type(e).__name__}: {e}")
  out = capsys.readouterr().out
  assert (tmp_path / "sevens.png").exists()
  # What the snippets computed: 20 samples of labels 3, 7, ...; edits of the model's size.
  assert namespace["images"].shape == (20, 8, 8, 1)
  assert namespace["variations"].shape == (20, 8, 8, 1)
  assert namespace["result"]["num_samples"] == 100
  assert [row[0] for row in namespace["rows"]] == [1.0, 2.0, 4.0]
  assert "cfg_scale 4.0: accuracy" in out
