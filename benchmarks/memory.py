"""Memory of the train step, from the compiled program: a grid of scan / remat settings, or the
largest batch that fits a device memory budget.

  python benchmarks/memory.py --grid                 # S/2 f32 batch 16: scan x remat x depth
  python benchmarks/memory.py                        # largest batch: DiT-XL/2 bf16, 80 GB H100
  python benchmarks/memory.py --model=S/2 --budget_gb=4 --granularity=1   # quick

Nothing is allocated or run, and nothing is timed (so it may run next to other jobs): each
program is lowered on abstract shapes and compiled, and XLA's memory analysis of the compiled
program gives the bytes it needs per device. Run it on the target device for that device's
figures: the CPU compiler's buffer assignment (fusion, bf16 handling) differs from a GPU's.

--grid: for every depth in --depths, scan in --scans and remat in --remat (with each
--policies name when on), the temporaries (`temp_size_in_bytes`) of (a) `grad`: jax.grad of
mean(model(x, t, label)^2) at --batch, the figure docs/performance.md quotes (scanned: the
params in the stacked layout), and (b) `train_step`: the train loop's whole update step
(dit.train.setup: loss, grads, AdamW, EMA, NaN guard, state donated; scanned: the state
stacked), plus its argument / output / alias sizes. The JSON's "targets" compares
remat to no remat at each depth, and the deepest to the shallowest with remat. Writes
benchmarks/results/memory.json unless --out is given.

Batch search (no --grid): for a batch b the update step's bytes per device are arguments +
outputs - donated (aliased) + temporaries. The search assumes that is roughly affine in b: two
compiles fit a line, the line's guess is checked, and a bisection (guided by the line) finds
the largest multiple of --granularity that fits in --budget_gb (--fit_only stops after the
two compiles and reports the line's estimate, for when a compile takes many minutes, e.g.
XL/2 on a CPU). Writes benchmarks/results/memory_<model>_<dtype>_<backend>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Repo root.
from benchmarks import common  # noqa: E402
from benchmarks import train as train_bench  # noqa: E402
from dit.models import dit as dit_model  # noqa: E402
from dit.models import repeat  # noqa: E402

GB = 1e9
MIB = 2**20
# The remat policies the grid tries by default ("" = keep only each block's input).
POLICIES = ",dots_with_no_batch_dims_saveable,dots_saveable,offload_dot_with_no_batch_dims"
MEASURES = ("grad", "train_step")
# The goals for remat (the issue that asked for it): temporaries at most 40% of no remat's,
# and at most 25% more at the deepest depth than at the shallowest.
TARGET_RATIO, TARGET_GROWTH = 0.4, 0.25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--grid", action="store_true", help="the scan x remat x depth grid")
  p.add_argument("--model", default=None, help="DiT preset (default: S/2 grid, XL/2 search)")
  p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                 help="default: float32 grid, bfloat16 search")  # fmt: skip
  p.add_argument("--attention", default="xla", help="xla | cudnn | einsum")
  p.add_argument("--overrides", default="", help="config.model fields, e.g. depth=1,num_heads=2")
  p.add_argument("--remat", default="off,on", help="which settings: off, on or both")
  # The grid's.
  p.add_argument("--batch", type=int, default=16, help="grid: global batch")
  p.add_argument("--depths", default="6,12", help="grid: model depths")
  p.add_argument("--scans", default="off,on", help="grid: scan settings, off and/or on")
  p.add_argument("--policies", default=POLICIES, help="grid: remat_policy names with remat on")
  p.add_argument("--measures", default=",".join(MEASURES), help="grid: grad and/or train_step")
  # The batch search's.
  p.add_argument("--scan", action="store_true", help="search: scan the blocks")
  p.add_argument("--remat_policy", default="", help="search: remat_policy when remat is on")
  p.add_argument("--budget_gb", type=float, default=80.0, help="bytes per device, in 1e9")
  p.add_argument("--granularity", type=int, default=8, help="batch sizes tried are multiples")
  p.add_argument("--max_batch", type=int, default=8192)
  p.add_argument(
    "--fit_only", action="store_true", help="two compiles, report the line's estimate unchecked"
  )
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  args = p.parse_args(argv)
  args.model = args.model or ("S/2" if args.grid else "XL/2")
  args.dtype = args.dtype or ("float32" if args.grid else "bfloat16")
  return args


def _list(text: str, allowed=None) -> list[str]:
  items = [item.strip() for item in text.split(",")]
  if allowed is not None and (not items or any(i not in allowed for i in items)):
    raise ValueError(f"expected a comma-separated list of {allowed}, got {text!r}")
  return items


def _config(args, *, batch: int, remat: bool, overrides: str):
  return common.dit_config(
    args.model, batch=batch, dtype=args.dtype, attention=args.attention, remat=remat,
    overrides=",".join(o for o in (args.overrides, overrides) if o),
  )  # fmt: skip


def train_step_memory(config) -> dict:
  """Compiled memory analysis (bytes per device) of the train loop's update step."""
  step, _, abstract_state, sharding = train_bench.make_update(config)
  batch = train_bench.abstract_batch(config, sharding)
  compiled = step.lower(abstract_state, batch, {}).compile()  # {}: no frozen inputs.
  return common.memory_bytes(compiled.memory_analysis())


def grad_temp_bytes(config) -> int:
  """Temporaries of jax.grad of mean(model(x, t, label)^2), params abstract (scanned: in the
  stacked layout, as the train state keeps them)."""
  model = dit_model.build_model(config.model)
  x, t, cond = dit_model.example_inputs(model, config.batch_size)
  params = dit_model.abstract_params(model)
  if config.model.scan:
    stacks = repeat.find_stacks(model, *dit_model.example_inputs(model))
    params = jax.eval_shape(lambda p: repeat.stack_tree(p, stacks), params)
  grad = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, cond) ** 2))
  return int(jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes)


def step_memory(args: argparse.Namespace, batch: int, remat: bool) -> dict:
  """Compiled memory analysis (bytes per device) of the train step at global batch `batch`."""
  policy = args.remat_policy if remat else ""
  settings = f"scan={str(args.scan).lower()},remat_policy={policy}"
  start = time.perf_counter()
  mem = train_step_memory(_config(args, batch=batch, remat=remat, overrides=settings))
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


def grid_row(args: argparse.Namespace, depth: int, scan: bool, policy: str | None) -> dict:
  """One setting's figures; policy None = remat off."""
  row = {"depth": depth, "scan": scan, "remat": policy is not None, "remat_policy": policy or ""}
  settings = f"depth={depth},scan={str(scan).lower()},remat_policy={policy or ''}"
  try:
    config = _config(args, batch=args.batch, remat=policy is not None, overrides=settings)
    dit_model.build_model(config.model)._check_fields()  # E.g. offload without scan.
  except ValueError as e:
    return {**row, "skipped": str(e)}
  measures = _list(args.measures, MEASURES)
  if "grad" in measures:
    row["grad_temp_bytes"] = grad_temp_bytes(config)
    row["grad_temp_mib"] = row["grad_temp_bytes"] / MIB
  if "train_step" in measures:
    row["train_step_bytes"] = train_step_memory(config)
    row["train_step_temp_mib"] = row["train_step_bytes"]["temp"] / MIB
  figures = ", ".join(f"{m} {row[f'{m}_temp_mib']:.1f} MiB" for m in measures)
  print(f"depth {depth} scan {scan} remat {row['remat']} {row['remat_policy']!r}: {figures}")
  return row


def _figure(rows: list[dict], key: str, *, scan: bool, remat: bool, depth: int) -> float | None:
  """rows' `key` for plain remat (policy "") or no remat; None if not measured."""
  for r in rows:
    if (r["scan"], r["remat"], r["depth"], r["remat_policy"]) == (scan, remat, depth, ""):
      return r.get(key)
  return None


def targets(rows: list[dict], measures: list[str]) -> dict:
  """Plain remat against no remat at each depth, and the deepest vs the shallowest depth."""
  depths = sorted({r["depth"] for r in rows})
  out = {}
  for scan in sorted({r["scan"] for r in rows}):
    for measure in measures:
      fig = lambda remat, depth, scan=scan, measure=measure: _figure(
        rows, f"{measure}_temp_mib", scan=scan, remat=remat, depth=depth
      )
      ratios = {d: fig(True, d) / fig(False, d) for d in depths if fig(True, d) and fig(False, d)}
      lo, hi = fig(True, depths[0]), fig(True, depths[-1])
      growth = hi / lo - 1 if lo and hi and len(depths) > 1 else None
      out[f"scan_{'on' if scan else 'off'}_{measure}"] = {
        "remat_over_no_remat": ratios,
        f"growth_depth_{depths[0]}_to_{depths[-1]}": growth,
        "ratio_met": bool(ratios) and max(ratios.values()) <= TARGET_RATIO,
        "growth_met": growth is not None and growth <= TARGET_GROWTH,
      }
  return out


def run_grid(args: argparse.Namespace) -> dict:
  depths = [int(d) for d in _list(args.depths)]
  scans = [s == "on" for s in _list(args.scans, ("off", "on"))]
  policies = _list(args.policies)
  remats = _list(args.remat, ("off", "on"))
  settings = ([None] if "off" in remats else []) + (policies if "on" in remats else [])
  rows = [grid_row(args, d, s, p) for d in depths for s in scans for p in settings]
  measures = _list(args.measures, MEASURES)
  return {
    "benchmark": "memory_grid",
    "model": args.model,
    "dtype": args.dtype,
    "attention": args.attention,
    "overrides": args.overrides,
    "batch": args.batch,
    "method": "compiled memory_analysis().temp_size_in_bytes (no allocation, no timing)",
    "targets_goal": {"remat_over_no_remat_max": TARGET_RATIO, "growth_max": TARGET_GROWTH},
    "targets": targets(rows, measures),
    "rows": rows,
    **common.metadata(),
  }


def run(args: argparse.Namespace) -> dict:
  modes = _list(args.remat, ("off", "on"))
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
    "scan": args.scan,
    "remat_policy": args.remat_policy,
    "budget_gb": args.budget_gb,
    "granularity": args.granularity,
    "method": "compiled memory_analysis: argument + output - alias + temp, per device",
    **results,
    **common.metadata(),
  }


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.grid:
    result = run_grid(args)
    for name, target in result["targets"].items():
      print(name, target)
    common.write_json(args.out or os.path.join(common.RESULTS_DIR, "memory.json"), result)
    return result
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
