"""Preemption and crashes: SIGTERM saves before exiting; a run SIGKILLed at random moments
(during a save too) and restarted with the same command ends bit-identical to an
uninterrupted run. Checksums: what they detect, and that a step failing them is moved aside
and saved again. (Damaged checkpoints through the command line: tests/test_faults.py.)"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, TINY_OVERRIDES, tiny_config

from dit import checkpoint, train

RUN = {"optim.schedule": "constant"}


pytestmark = pytest.mark.usefixtures("compilation_cache")


def start_train(workdir, cache_dir, **overrides):
  """`python -m dit.train` in the background, like a user's job."""
  flags = [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **RUN, **overrides}.items()]
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_DEFAULT_MATMUL_PRECISION="highest",
  )
  cmd = [sys.executable, "-m", "dit.train", "--config=configs/digits.py", f"--workdir={workdir}"]
  return subprocess.Popen(
    [*cmd, *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def logged_steps(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return sum(1 for line in f if line.endswith("\n"))
  except FileNotFoundError:
    return 0


def wait_until(predicate, proc, timeout=600):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      return False
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.005)
  return True


def restore(workdir, **overrides):
  state, data = train.restore_state(tiny_config(**RUN, **overrides), str(workdir))
  return jax.device_get(state), data


def assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.mark.slow  # A subprocess train run (about 18 s).
def test_sigterm_saves_before_exit(tmp_path, compilation_cache):
  """Preemption: SIGTERM mid-run saves the current step, exits 143, and that checkpoint
  is exactly the state an uninterrupted run has at that step."""
  workdir = tmp_path / "run"
  # Checkpoints only at the end (never reached): whatever is saved comes from SIGTERM.
  proc = start_train(workdir, compilation_cache, total_steps=100_000, ckpt_every=100_000)
  try:
    assert wait_until(lambda: logged_steps(workdir) >= 2, proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 143, err[-3000:]
  saved = int(err.split("SIGTERM: saved checkpoint at step ")[1].split(";")[0])
  assert saved >= 2
  assert sorted(os.listdir(workdir / "ckpt")) == [str(saved)]
  state, data = restore(workdir)
  assert int(state["step"]) == saved and data["step"] == saved
  reference = train.train_and_evaluate(tiny_config(**RUN, total_steps=saved), str(tmp_path / "ref"))
  assert_tree_equal(reference, state)


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bit_exact(tmp_path, compilation_cache):
  """Kills (SIGKILL) while a checkpoint is being written, at random moments while
  training, and during start-up; each restart resumes; the end is bit-identical."""
  steps = 12
  overrides = {"total_steps": steps, "ckpt_every": 1, "keep_ckpts": 2}
  workdir = tmp_path / "run"
  ckpt = workdir / "ckpt"
  rng = random.Random(0)

  def saving():
    return ckpt.is_dir() and any("tmp" in name for name in os.listdir(ckpt))

  kills = 0
  for attempt in ("during_save", "random", "random", "startup", "finish"):
    done = logged_steps(workdir)
    proc = start_train(workdir, compilation_cache, **overrides)
    try:
      if attempt == "during_save":
        started = wait_until(lambda d=done: logged_steps(workdir) > d and saving(), proc)
      elif attempt == "random":
        started = wait_until(lambda d=done: logged_steps(workdir) > d, proc)
        time.sleep(rng.uniform(0.0, 0.5))
      elif attempt == "startup":
        started = True
        time.sleep(rng.uniform(0.5, 3.0))
      else:
        started = False
      if started and proc.poll() is None:
        proc.kill()
        kills += 1
      _, err = proc.communicate(timeout=600)
    finally:
      proc.kill()
    if attempt == "finish":
      assert proc.returncode == 0, err[-3000:]
  assert kills >= 3

  state, data = restore(workdir, **overrides)
  assert int(state["step"]) == steps and data["step"] == steps
  reference_dir = tmp_path / "ref"
  reference = train.train_and_evaluate(tiny_config(**RUN, **overrides), str(reference_dir))
  assert_tree_equal(reference, state)
  # metrics.jsonl was rewound at each restart: one row per step, as in the reference.
  rows = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, open(d / "metrics.jsonl"))]
  assert rows(workdir) == rows(reference_dir)


def small_state(step: int, w: float = 0.5) -> dict:
  w = jnp.full((3, 4), w, jnp.float32)
  return {"step": jnp.int32(step), "params": {"w": w}, "ema_params": {"w": w}, "opt_state": ()}


def test_checksums_see_every_value():
  state = small_state(1)
  sums, nonfinite = checkpoint.checksums(state)
  assert sorted(sums) == ["ema_params/w", "params/w", "step"] and nonfinite == []
  assert checkpoint.verify(state, {"algorithm": checkpoint.CHECKSUM_ALGORITHM, "arrays": sums}) == (
    "verified"
  )
  assert checkpoint.verify(state, None) == "unverified"  # Written before checksums.
  w = state["params"]["w"]
  one_ulp = dict(state, params={"w": w.at[2, 3].set(jnp.nextafter(w[2, 3], 1.0))})
  swapped = dict(state, params={"w": w.at[0, 0].set(0.25).at[0, 1].set(0.75)})
  for changed in (one_ulp, swapped):
    assert checkpoint.checksums(changed)[0]["params/w"] != sums["params/w"]
  nan = dict(state, ema_params={"w": w.at[1, 1].set(jnp.nan)})
  assert checkpoint.checksums(nan)[1] == ["ema_params/w"]
  with pytest.raises(checkpoint.CorruptCheckpoint, match="non-finite values in 1 array"):
    checkpoint.verify(nan, None)
  with pytest.raises(FloatingPointError, match="Refusing to save a non-finite checkpoint"):
    checkpoint.save(None, nan, {"step": 1})


def test_step_failing_its_checksums_is_moved_aside_and_saved_again(tmp_path, capsys):
  """A value changed on disk (finite, readable: only the checksum sees it) is skipped for
  the previous step, moved to ckpt/corrupt/, and the manager saves that step again."""
  config = tiny_config()
  mngr = checkpoint.manager(str(tmp_path), config)
  for step in (1, 2):
    checkpoint.save(mngr, small_state(step), {"step": step})
  mngr.wait_until_finished()
  record, _ = checkpoint.checksums(small_state(2))
  shutil.rmtree(tmp_path / "ckpt" / "2")
  json_handler = ocp.JsonCheckpointHandler()
  handlers = {
    "state": ocp.StandardCheckpointHandler(),
    "data": json_handler,
    "checksums": json_handler,
  }
  raw = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers)
  record = {"algorithm": checkpoint.CHECKSUM_ALGORITHM, "arrays": record}
  rotten = ocp.args.Composite(
    state=ocp.args.StandardSave(small_state(2, w=0.5000001)),
    data=ocp.args.JsonSave({"step": 2}),
    checksums=ocp.args.JsonSave(record),
  )
  raw.save(2, args=rotten)
  raw.wait_until_finished()

  mngr = checkpoint.manager(str(tmp_path), config)
  abstract = jax.eval_shape(lambda: small_state(0))
  state, data = checkpoint.restore(mngr, abstract)
  assert int(state["step"]) == 1 and data == {"step": 1}
  err = capsys.readouterr().err
  assert "checkpoint step 2 in" in err and "checksum mismatch in 2 item(s)" in err
  (moved,) = os.listdir(tmp_path / "ckpt" / "corrupt")
  assert moved.startswith("2-") and os.listdir(tmp_path / "ckpt" / "corrupt" / moved)
  assert mngr.all_steps() == [1]
  checkpoint.save(mngr, small_state(2), {"step": 2})
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1, 2]
  state, _ = checkpoint.restore(mngr, abstract)
  assert int(state["step"]) == 2
