"""Multi-host training: two processes on localhost (CPU, gloo collectives) train the digits
config together and end with the parameters of a one-process run on the same global batch."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES, tiny_config

from dit import train

# Two processes of one device each sum their gradients in another order than one device.
ATOL = 1e-5

RUN = {"optim.schedule": "constant", "ckpt_every": 2}


pytestmark = pytest.mark.usefixtures("compilation_cache")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_hosts(workdir, cache_dir, num_processes=2, **overrides):
  """Starts `dit.train --config.distributed=True` as `num_processes` local processes."""
  flags = [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **RUN, **overrides}.items()]
  port = free_port()
  procs = []
  for i in range(num_processes):
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=1",
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(i),
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_DEFAULT_MATMUL_PRECISION="highest",
    )
    cmd = [sys.executable, "-m", "dit.train", "--config=configs/digits.py"]
    cmd += [f"--workdir={workdir}", "--config.distributed=True", *flags]
    procs.append(
      subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    )
  outputs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append((p.returncode, out.decode(), err.decode()))
  return outputs


def restore_params(workdir, **overrides):
  state, data = train.restore_state(tiny_config(**RUN, **overrides), str(workdir))
  return jax.device_get(state), data


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The same run in one process on one device."""
  workdir = tmp_path_factory.mktemp("one_host")
  state = train.train_and_evaluate(tiny_config(**RUN), str(workdir))
  return jax.device_get(state), workdir


@pytest.mark.parametrize(
  "overrides",
  [
    # The pod path: FSDP-sharded parameters across the two hosts.
    {"parallelism": "mesh", "mesh.data": 1, "mesh.fsdp": 2, "mesh.fsdp_min_size": 256},
    pytest.param({"parallelism": "pmap"}, marks=pytest.mark.slow),
  ],
  ids=["mesh_fsdp", "pmap"],
)
def test_two_hosts_match_one_host(tmp_path, reference, compilation_cache, overrides):
  ref_state, ref_dir = reference
  workdir = tmp_path / "run"
  outputs = launch_hosts(workdir, compilation_cache, **overrides)
  for i, (rc, _, err) in enumerate(outputs):
    assert rc == 0, f"process {i}:\n{err[-4000:]}"
  # Only process 0 prints the summary and writes logs.
  assert "devices: 2 (cpu" in outputs[0][1] and "2 process(es)" in outputs[0][1]
  assert "devices:" not in outputs[1][1]
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  with open(ref_dir / "metrics.jsonl") as f:
    ref_rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows], rtol=1e-5)
  # The checkpoint written by both hosts restores onto this one device.
  state, data = restore_params(workdir)
  assert int(state["step"]) == 4 and data["step"] == 4
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=0),
    ref_state["params"],
    state["params"],
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=0),
    ref_state["ema_params"],
    state["ema_params"],
  )
