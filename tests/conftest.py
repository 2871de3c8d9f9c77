"""Test setup: CPU only, float32 matmuls, small thread pools (CI has 2 cores)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import os as _os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A digits run small enough for tests: one block, a few steps, no sampling.
TINY_OVERRIDES = {
  "total_steps": 4,
  "batch_size": 8,
  "log_every": 1,
  "ckpt_every": 2,
  "sample_every": 0,
  "progress_bar": False,
  "optim.warmup_steps": 0,
  "model.hidden_size": 32,
  "model.depth": 1,
  "model.num_heads": 2,
  "sample.num": 0,
  "sample.steps": 5,
}


def tiny_config(config_file: str = "configs/digits.py", **overrides):
  """`config_file` (configs/digits.py) with TINY_OVERRIDES and `overrides` ("a.b" keys as a__b)."""
  from dit.cli import load_config

  config = load_config(str(ROOT / config_file))
  for key, value in {
    **TINY_OVERRIDES,
    **{k.replace("__", "."): v for k, v in overrides.items()},
  }.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def run_cli(module, *args, devices=1, timeout=300, **overrides):
  """Runs `python -m module args --config.k=v ...` with `devices` forced CPU devices."""
  flags = [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **overrides}.items()]
  env = dict(_os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run(
    [sys.executable, "-m", module, *args, *flags],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture
def tiny():
  return tiny_config


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache shared by a module's train runs and their subprocesses."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  path = str(tmp_path_factory.getbasetemp() / "jax_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()
  yield path
  jax.config.update("jax_compilation_cache_dir", None)
  cc.reset_cache()
