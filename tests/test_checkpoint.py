"""Preemption and crashes: SIGTERM saves before exiting; a run SIGKILLed at random moments
(during a save too) and restarted with the same command ends bit-identical to an
uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES, tiny_config

from dit import train

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
