"""The code base stays `ruff` clean (lint and format), as CI would check it."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
  ruff = shutil.which("ruff") or pytest.skip("ruff is not installed")
  result = subprocess.run([ruff, *args, "."], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
