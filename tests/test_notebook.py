"""The notebooks run top to bottom (fast mode) and are committed with the outputs of a full run.

notebooks/explore.ipynb trains the digits demo (or loads it); notebooks/samplers.ipynb loads
that run. The fast runs share one run directory, so the second notebook loads the first's
checkpoint instead of training again.
"""

import os
import sys

import pytest
from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = ROOT / "notebooks"
# Pictures a full run shows, at least: explore: noising, SNR, loss, samplers x CFG, CFG sweep,
# trajectory, inpainting; samplers: 8 grids of settings, the numbers, one more, diffusers'.
FULL_IMAGES = {"explore.ipynb": 7, "samplers.ipynb": 8}
FAST_IMAGES = {"explore.ipynb": 6, "samplers.ipynb": 8}


def _outputs(nb, kind):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == kind]


def _images(nb):
  return [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


@pytest.mark.parametrize("name", sorted(FULL_IMAGES))
def test_notebook_is_committed_with_the_outputs_of_a_full_run(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  # Run top to bottom once: every cell executed, in order.
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert not _outputs(nb, "error")
  assert len(_images(nb)) >= FULL_IMAGES[name]
  text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
  assert "full mode" in text and "fast mode" not in text, text[:200]
  assert os.path.getsize(NOTEBOOKS / name) < 3_000_000  # Pictures, not a training log.


def _execute(name, workdir, monkeypatch):
  pytest.importorskip("ipykernel")
  # The kernel inherits this environment: fast mode, CPU, the run directory.
  monkeypatch.setenv("DIT_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("DIT_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The venv's python3 kernel runs this interpreter's packages.
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
  )
  client.execute()  # Raises CellExecutionError, naming the cell, if any cell fails.
  assert not _outputs(nb, "error")
  assert len(_images(nb)) >= FAST_IMAGES[name]
  return nb


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
  return tmp_path_factory.mktemp("notebook") / "run"


@pytest.mark.slow  # About 29 s; the default run's budget.
def test_explore_runs_top_to_bottom(fast_run, monkeypatch):
  nb = _execute("explore.ipynb", fast_run, monkeypatch)
  assert (fast_run / "metrics.jsonl").exists()
  assert "max change in the kept half: 0.0e+00" in "".join(
    o.get("text", "") for o in _outputs(nb, "stream")
  )


@pytest.mark.slow  # Like test_explore_runs_top_to_bottom (-m slow runs both notebooks).
def test_samplers_runs_top_to_bottom_on_explores_run(fast_run, monkeypatch):
  if not (fast_run / "ckpt").is_dir():
    pytest.skip("needs test_explore_runs_top_to_bottom's run")
  before = sorted(os.listdir(fast_run / "ckpt"))
  nb = _execute("samplers.ipynb", fast_run, monkeypatch)
  assert sorted(os.listdir(fast_run / "ckpt")) == before  # Loaded, not trained again.
  text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
  if "skipped" not in text:  # With the torch extra: diffusers from the same noise as ours.
    assert "max |diffusers - dit|" in text
