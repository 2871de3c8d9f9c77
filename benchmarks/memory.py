"""The largest batch whose train step fits a device memory budget, with and without remat.

  python benchmarks/memory.py                        # DiT-XL/2 bf16 on one 80 GB H100
  python benchmarks/memory.py --model=S/2 --budget_gb=4 --granularity=1   # quick

Nothing is allocated or run: for a batch b the train loop's update step (benchmarks/train.py,
state donated) is lowered on abstract shapes and compiled, and XLA's memory analysis of the
compiled program gives the bytes it needs per device: arguments + outputs - donated (aliased)
+ temporaries. The search assumes that is roughly affine in b: two compiles fit a line, the
line's guess is checked, and a bisection (guided by the line) finds the largest multiple of
--granularity that fits in --budget_gb (--fit_only stops after the two compiles and reports
the line's estimate, for when a compile takes many minutes, e.g. XL/2 on a CPU). Run it on
the target device for that device's figures: the CPU compiler's buffer assignment (fusion,
bf16 handling) differs from a GPU's.

Writes benchmarks/results/memory_<model>_<dtype>_<backend>.json unless --out is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Repo root.
from benchmarks import common  # noqa: E402
from benchmarks import train as train_bench  # noqa: E402

GB = 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="XL/2", help="DiT preset of configs/imagenet256_dit.py")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--attention", default="xla", help="xla | cudnn | einsum")
  p.add_argument("--overrides", default="", help="config.model fields, e.g. depth=1,num_heads=2")
  p.add_argument("--budget_gb", type=float, default=80.0, help="bytes per device, in 1e9")
  p.add_argument("--granularity", type=int, default=8, help="batch sizes tried are multiples")
  p.add_argument("--max_batch", type=int, default=8192)
  p.add_argument("--remat", default="off,on", help="which settings to search: off, on or both")
  p.add_argument(
    "--fit_only", action="store_true", help="two compiles, report the line's estimate unchecked"
  )
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  return p.parse_args(argv)


def step_memory(args: argparse.Namespace, batch: int, remat: bool) -> dict:
  """Compiled memory analysis (bytes per device) of the train step at global batch `batch`."""
  config = common.dit_config(
    args.model, batch=batch, dtype=args.dtype, attention=args.attention, remat=remat,
    overrides=args.overrides,
  )  # fmt: skip
  step, _, abstract_state, sharding = train_bench.make_update(config)
  start = time.perf_counter()
  batch = train_bench.abstract_batch(config, sharding)
  compiled = step.lower(abstract_state, batch, {}).compile()  # {}: no frozen inputs.
  mem = common.memory_bytes(compiled.memory_analysis())
  mem["compile_s"] = time.perf_counter() - start
  print(f"  remat={remat} batch={batch}: {mem['total'] / GB:.2f} GB ({mem['compile_s']:.0f} s)")
  return mem


def search(args: argparse.Namespace, remat: bool) -> dict:
  """Largest per-device batch, a multiple of args.granularity <= max_batch, that fits."""
  g, budget = args.granularity, args.budget_gb * GB
  probes: dict[int, dict] = {}

  def fits(b: int) -> bool:
    if b not in probes:
      probes[b] = step_memory(args, b * jax.device_count(), remat)
    return probes[b]["total"] <= budget

  def line_guess() -> float:
    # The line through the two probes nearest the budget, where it crosses the budget.
    (b0, m0), (b1, m1) = sorted(probes.items(), key=lambda kv: abs(kv[1]["total"] - budget))[:2]
    slope = (m1["total"] - m0["total"]) / (b1 - b0)
    return b0 + (budget - m0["total"]) / slope if slope > 0 else float("inf")

  if not fits(g):
    return {"max_batch_per_device": 0, "probes": _rows(probes)}
  lo, hi = g, args.max_batch // g * g + g  # lo fits; hi is taken not to fit.
  if fits(2 * g):
    lo = 2 * g
  else:
    hi = 2 * g
  estimate = int(min(line_guess() // g * g, args.max_batch))
  while hi - lo > g and not args.fit_only:
    b = int(min(max(line_guess() // g * g, lo + g), hi - g))
    lo, hi = (b, hi) if fits(b) else (lo, b)
  (b0, m0), (b1, m1) = sorted(probes.items())[:2]
  per_image = (m1["total"] - m0["total"]) / (b1 - b0)
  if args.fit_only:
    lo = max(lo, estimate)
  return {
    "max_batch_per_device": lo,
    "max_batch_global": lo * jax.device_count(),
    "checked": lo in probes,  # False with --fit_only: the affine fit's estimate.
    "bytes_at_max": probes[lo]["total"] if lo in probes else None,
    "bytes_per_image": per_image,
    "fixed_bytes": m0["total"] - per_image * b0,
    "probes": _rows(probes),
  }


def _rows(probes: dict[int, dict]) -> list[dict]:
  return [{"batch_per_device": b, **m} for b, m in sorted(probes.items())]


def run(args: argparse.Namespace) -> dict:
  modes = [m.strip() for m in args.remat.split(",")]
  if not modes or any(m not in ("off", "on") for m in modes):
    raise ValueError(f"--remat must list 'off' and/or 'on', got {args.remat!r}")
  results = {}
  for mode in modes:
    print(f"remat {mode}:")
    results[f"remat_{mode}"] = search(args, remat=mode == "on")
  return {
    "benchmark": "memory",
    "model": args.model,
    "dtype": args.dtype,
    "attention": args.attention,
    "overrides": args.overrides,
    "budget_gb": args.budget_gb,
    "granularity": args.granularity,
    "method": "compiled memory_analysis: argument + output - alias + temp, per device",
    **results,
    **common.metadata(),
  }


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  result = run(args)
  for mode in ("off", "on"):
    if f"remat_{mode}" in result:
      r = result[f"remat_{mode}"]
      print(f"remat {mode}: largest batch per device {r['max_batch_per_device']}")
  out = args.out or os.path.join(
    common.RESULTS_DIR,
    f"memory_{args.model.replace('/', '')}_{args.dtype}_{jax.default_backend()}.json",
  )
  common.write_json(out, result)
  return result


if __name__ == "__main__":
  main()
