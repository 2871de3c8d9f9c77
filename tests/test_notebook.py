"""notebooks/explore.ipynb runs top to bottom (fast mode) and is stored without outputs."""

import os
import sys

import pytest
from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = ROOT / "notebooks" / "explore.ipynb"


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "the notebook has no code cells"
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  pytest.importorskip("ipykernel")
  # The kernel inherits this environment: fast mode, CPU, a fresh run directory.
  monkeypatch.setenv("DIT_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("DIT_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The venv's python3 kernel runs this interpreter's packages.
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=300,
    kernel_name="python3",
    resources={"metadata": {"path": str(ROOT / "notebooks")}},
  )
  client.execute()  # Raises CellExecutionError, naming the cell, if any cell fails.
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) >= 6  # Noising, SNR, loss, samplers x CFG, trajectory, inpainting.
  assert (tmp_path / "run" / "metrics.jsonl").exists()
