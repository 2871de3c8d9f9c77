"""The train loop: outputs, device-count invariance, resume, NaN guard, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli, tiny_config

from dit import train
from dit.diffusion import schedules
from dit.models import dit as dit_model


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_writes_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"sample.num": 20})
  state = train.train_and_evaluate(config, workdir)
  assert int(state["step"]) == 4
  files = set(os.listdir(workdir))
  assert {"config.json", "metrics.jsonl", "ckpt", "tb", "grid.png"} <= files
  assert os.listdir(os.path.join(workdir, "tb"))
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for key in ("loss", "grad_norm", "lr", "steps_per_sec", "img_per_sec"):
    assert np.isfinite(rows[-1][key]), key
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["hidden_size"] == 32


def test_loss_decreases_on_fixed_batch():
  """Fitting one fixed batch drives the eps-MSE loss well below its starting value."""
  config = tiny_config(
    **{"optim.lr": 3e-3, "optim.schedule": "constant", "model.class_dropout_prob": 0.0}
  )
  model = dit_model.build_model(config.model)
  tx, lr = train.make_optimizer(config)
  schedule = schedules.make_schedule("linear", 1000)
  update = jax.jit(train.make_update_fn(config, model, schedule, tx, lr, axis_name=None))
  state = jax.jit(lambda: train.init_state(config, model, tx))()
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 1)), jnp.float32),
    "label": jnp.arange(8, dtype=jnp.int32),
  }
  losses = []
  for _ in range(150):
    # Same batch and the same noise each step: reset the step counter that seeds it.
    state["step"] = jnp.zeros((), jnp.int32)
    state, metrics = update(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_nan_batch_skips_update():
  config = tiny_config()
  model = dit_model.build_model(config.model)
  tx, lr = train.make_optimizer(config)
  update = jax.jit(
    train.make_update_fn(config, model, schedules.make_schedule("linear", 1000), tx, lr, None)
  )
  state = jax.jit(lambda: train.init_state(config, model, tx))()
  before = jax.device_get(state["params"])
  batch = {"image": jnp.full((8, 16, 16, 1), jnp.nan), "label": jnp.zeros((8,), jnp.int32)}
  state, metrics = update(state, batch)
  assert int(metrics["bad_steps"]) == 1 and int(metrics["skipped_steps"]) == 1
  assert int(state["step"]) == 1
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state["params"]))


def test_resume_is_bit_exact(tmp_path):
  """4 steps straight == 2 steps, stop, restart with the same command to step 4."""
  # A constant schedule, so that stopping early via total_steps is like an interruption.
  config = lambda **kw: tiny_config(**{"optim.schedule": "constant"}, **kw)
  straight = train.train_and_evaluate(config(), str(tmp_path / "a"))
  train.train_and_evaluate(config(total_steps=2), str(tmp_path / "b"))
  resumed = train.train_and_evaluate(config(), str(tmp_path / "b"))
  assert int(resumed["step"]) == 4
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(straight["params"]),
    jax.device_get(resumed["params"]),
  )
  assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [
    r["loss"] for r in read_metrics(tmp_path / "b")
  ]


def test_resume_rejects_incompatible_config(tmp_path):
  train.train_and_evaluate(tiny_config(total_steps=2), str(tmp_path / "run"))
  with pytest.raises(train.UserError, match="model.hidden_size: checkpoint has 32, config has 64"):
    train.train_and_evaluate(tiny_config(**{"model.hidden_size": 64}), str(tmp_path / "run"))


def test_one_and_four_devices_same_loss_curve(tmp_path):
  """Same global batch and seed: 1 device and 4 forced host devices agree."""
  curves = {}
  for n in (1, 4):
    workdir = str(tmp_path / f"d{n}")
    result = run_cli("dit.train", "--config=configs/digits.py", f"--workdir={workdir}", devices=n)
    assert result.returncode == 0, result.stderr[-3000:]
    curves[n] = [r["loss"] for r in read_metrics(workdir)]
  assert len(curves[1]) == 4
  np.testing.assert_allclose(curves[1], curves[4], rtol=1e-5)


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.bogus=1"], "Unknown config key 'bogus'"),
    (["--config.model.depthh=2"], "Unknown config key 'model.depthh'"),
    (["--config.batch_size=0"], "config.batch_size must be positive, got 0"),
    (["--config.batch_size=6"], "batch_size=6 is not divisible by the data-parallel size (4"),
    (["--workdir=/nonexistent/parent/run"], "parent of --workdir does not exist"),
    (["--workdir=/dev/null/run"], "parent of --workdir does not exist"),
  ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
  workdir_args = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path}/r"]
  result = run_cli("dit.train", "--config=configs/digits.py", *workdir_args, *args, devices=4)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(train.UserError, match="not writable"):
    train.prepare_workdir(str(blocker))
