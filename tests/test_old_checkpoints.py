"""Checkpoints written by main before the restructure restore, sample and resume after it.

The workdirs in tests/data/old_layout/ were written by the code of commit ca59e66 (see the
README there): their config.json files use the old model keys (`adaln`,
`class_dropout_prob`) and their checkpoints the old state layout.
"""

import contextlib
import io
import shutil

import jax
import numpy as np
import pytest
from conftest import ROOT

from dit import checkpoint, generate, train

OLD = ROOT / "tests" / "data" / "old_layout"
ARMS = ("digits_adaln_zero", "digits_adaln_single")

pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(params=ARMS)
def old_workdir(request, tmp_path):
  workdir = tmp_path / request.param
  shutil.copytree(OLD / request.param, workdir)  # Tests never write into the repository.
  return str(workdir)


def test_old_checkpoint_samples_as_before(old_workdir):
  config = checkpoint.read_config(old_workdir)
  model, params = generate.load_params(config, old_workdir)
  cond = generate.label_cond(config, np.arange(4) % 10)
  images = generate.generate(
    config, model, params, cond, jax.random.PRNGKey(0), 4, sampler="ddim", steps=5
  )
  expected = np.load(f"{old_workdir}/expected_samples.npz")["images"]
  np.testing.assert_allclose(np.asarray(images), expected, atol=1e-5, rtol=0)


def test_old_checkpoint_resumes_training(old_workdir):
  config = checkpoint.read_config(old_workdir)
  _, before = generate.load_params(config, old_workdir, use_ema=False)
  config.unlock()
  config.total_steps = 4
  config.lock()
  with contextlib.redirect_stdout(io.StringIO()) as out:
    state = train.train_and_evaluate(config, old_workdir)
  assert "Resumed from step 2." in out.getvalue()
  assert int(jax.device_get(state["step"])) == 4
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["params"], before)
  assert max(jax.tree.leaves(moved)) > 0  # Trained on from the restored params.
