"""Shared pieces of the benchmark scripts: configs, run metadata, timing, JSON output.

Timing protocol: compile and warm up first (excluded), then `windows` windows of
`steps_per_window` calls each, blocking on the result at the end of every window; the
reported figure is the median over windows (robust to a window disturbed by other load).
Comparisons (vs_pytorch.py) interleave A and B windows so that load hits both equally.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from typing import Any

import jax
import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
DIT_CONFIG = os.path.join(ROOT, "configs", "imagenet256_dit.py")


def dit_config(
  model: str, *, batch: int, dtype: str, attention: str, remat: bool, overrides: str = ""
) -> ml_collections.ConfigDict:
  """configs/imagenet256_dit.py:<model> with the benchmark's settings applied.

  overrides: "key=value,..." on config.model (e.g. "depth=1,hidden_size=64,num_heads=2"),
  for tiny smoke-test runs; values are typed by `dit.cli.apply_overrides`. An unknown key
  or a value of the wrong type is a `dit.cli.UserError` naming the valid keys or the type.
  """
  from dit import cli

  config = cli.load_config(f"{DIT_CONFIG}:{model}")
  settings = {
    "batch_size": batch,
    "parallelism": "mesh",
    "model.dtype": dtype,
    "model.attention_impl": attention,
    "model.remat": remat,
  }
  config = cli.apply_overrides(config, settings)
  items = [f"model.{item.strip()}" for item in overrides.split(",") if item.strip()]
  return cli.apply_overrides(config, items)


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers"):
    try:
      out[name] = importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
      pass
  return out


def metadata() -> dict[str, Any]:
  """Where and when: device, backend, versions, CPU count, load average, UTC date."""
  devices = jax.devices()
  return {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "load_average_1min": os.getloadavg()[0],
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "versions": versions(),
  }


def write_json(path: str, result: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print("wrote", path)


def block(tree: Any) -> Any:
  """Waits for every array in `tree` (JAX async dispatch); other leaves pass through."""
  return jax.block_until_ready(tree)


def time_window(fn: Callable[[], Any], steps: int) -> tuple[float, float]:
  """(wall, CPU) seconds per call of `fn` over `steps` back-to-back calls, blocking at the end.

  CPU time is this process's, all threads: on a machine shared with other jobs it is a
  steadier measure of work than wall time (which depends on the share of cores we get).
  """
  wall, cpu = time.perf_counter(), time.process_time()
  out = None
  for _ in range(steps):
    out = fn()
  block(out)
  return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def _summary(windows: list[tuple[float, float]]) -> dict[str, Any]:
  wall, cpu = [w for w, _ in windows], [c for _, c in windows]
  return {
    "s_per_call": statistics.median(wall),
    "window_s_per_call": wall,
    "cpu_s_per_call": statistics.median(cpu),
  }


def time_median(
  fn: Callable[[], Any], *, windows: int, steps_per_window: int, warmup: int = 1
) -> dict[str, Any]:
  """Median seconds per call over `windows` windows, after `warmup` untimed calls."""
  return time_interleaved(
    {"fn": fn}, windows=windows, steps_per_window=steps_per_window, warmup=warmup
  )["fn"]


def time_interleaved(
  fns: dict[str, Callable[[], Any]], *, windows: int, steps_per_window: int, warmup: int = 1
) -> dict[str, dict[str, Any]]:
  """Median seconds per call of several functions, their windows alternating A, B, A, B, ..."""
  if windows < 1 or steps_per_window < 1:
    raise ValueError(
      f"windows and steps_per_window must be >= 1, got {windows} and {steps_per_window}"
    )
  for fn in fns.values():
    for _ in range(warmup):
      block(fn())
  per_call = {name: [] for name in fns}
  for _ in range(windows):
    for name, fn in fns.items():
      per_call[name].append(time_window(fn, steps_per_window))
  return {name: _summary(v) for name, v in per_call.items()}


def compiled_stats(compiled) -> dict[str, Any]:
  """FLOPs (XLA cost analysis) and buffer sizes (memory analysis) of a compiled function."""
  out: dict[str, Any] = {"xla_flops": None, "memory": None}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if cost and "flops" in cost:
      out["xla_flops"] = float(cost["flops"])
  except Exception:  # Best effort: not every backend implements cost analysis.
    pass
  mem = compiled.memory_analysis()
  if mem is not None:
    out["memory"] = memory_bytes(mem)
  return out


def memory_bytes(mem) -> dict[str, int]:
  """CompiledMemoryStats -> dict; "total" = what the program needs at its peak on device.

  total = arguments + outputs - aliased (donated buffers reused for outputs) + temporaries.
  """
  fields = ("argument", "output", "alias", "temp", "generated_code")
  out = {f: int(getattr(mem, f"{f}_size_in_bytes", 0)) for f in fields}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["peak_reported"] = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)  # 0 on CPU.
  return out
