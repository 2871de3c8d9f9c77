"""Compile time of the train step (lower + compile), with the blocks unrolled and scanned.

  python benchmarks/compile.py          # S/2 at depth 6, 12, 24, scan off and on; XL/2 scanned
  python benchmarks/compile.py --tiny   # tiny widths, depths 1 and 2: a smoke test (seconds)

Each entry builds the train loop's update step for its config (dit.train.setup, as
benchmarks/train.py does) and times `lower` (tracing to StableHLO) and `compile` (XLA)
separately; nothing runs. The persistent compilation cache is off and every entry is a new
program, so nothing comes from a cache; one untimed lowering first pays JAX's one-off tracing
costs. Compiling is CPU-bound, so other load distorts it: the JSON records the 1-minute load
average before and after, the CPU count, and `noisy` when either load average exceeds the
CPU count. Measure on an idle machine. XL/2 unrolled is left out (about 10 minutes on a CPU).

Every entry also records the size of its traced program, a deterministic proxy of compile
time that any machine can measure: `jaxpr_eqns` (equations of the step's jaxpr, scan and cond
bodies included) and `stablehlo_lines` (of the lowered module). `--sizes_only` measures only
these: nothing is compiled or timed, so it may run next to other jobs.

Writes benchmarks/results/compile.json unless --out is given (--sizes_only: no default, it
prints).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.extend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Repo root.
from benchmarks import common  # noqa: E402
from benchmarks import train as train_bench  # noqa: E402

# (model preset, config.model overrides): the depth-swept model and the large one.
FULL = {"small": ("S/2", ""), "depths": "6,12,24", "large": ("XL/2", ""), "batch": 16}
TINY = {
  "small": ("S/8", "hidden_size=32,num_heads=2,input_size=8"),
  "depths": "1,2",
  "large": ("XL/8", "hidden_size=48,num_heads=3,input_size=8,depth=2"),
  "batch": 2,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny widths, depths 1-2 (a smoke test)")
  p.add_argument("--depths", default=None, help="depths of the small model (6,12,24; tiny 1,2)")
  p.add_argument("--scans", default="off,on", help="small model: scan off and/or on")
  p.add_argument("--large", default="on", choices=("on", "off"), help="XL/2 scanned too")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--remat", action="store_true", help="rematerialise the blocks")
  p.add_argument("--sizes_only", action="store_true", help="program sizes only, no timing")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  return p.parse_args(argv)


def entries(args: argparse.Namespace) -> list[dict]:
  """[{model, overrides, depth, scan}]: the small model at each depth and scan, then XL/2."""
  preset = TINY if args.tiny else FULL
  model, overrides = preset["small"]
  depths = [int(d) for d in (args.depths or preset["depths"]).split(",")]
  scans = [s.strip() == "on" for s in args.scans.split(",")]
  out = [
    {"model": model, "overrides": overrides, "depth": d, "scan": s} for d in depths for s in scans
  ]
  if args.large == "on":
    model, overrides = preset["large"]
    out.append({"model": model, "overrides": overrides, "depth": None, "scan": True})
  return out


def make_step(args: argparse.Namespace, entry: dict):
  """(jitted update step, abstract state, abstract batch) of an entry; nothing allocated."""
  items = [entry["overrides"], f"scan={str(entry['scan']).lower()}"]
  if entry["depth"] is not None:
    items.append(f"depth={entry['depth']}")
  config = common.dit_config(
    entry["model"], batch=(TINY if args.tiny else FULL)["batch"], dtype=args.dtype,
    attention="xla", remat=args.remat, overrides=",".join(i for i in items if i),
  )  # fmt: skip
  step, _, abstract_state, sharding = train_bench.make_update(config)
  return config, step, abstract_state, train_bench.abstract_batch(config, sharding)


def jaxpr_eqns(jaxpr) -> int:
  """Equations of a jaxpr, those of its sub-jaxprs (scan, cond, custom_vjp bodies) included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for value in eqn.params.values():
      for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, jax.extend.core.ClosedJaxpr):
          n += jaxpr_eqns(v.jaxpr)
        elif isinstance(v, jax.extend.core.Jaxpr):
          n += jaxpr_eqns(v)
  return n


def program_size(step, state, batch) -> dict:
  """{"jaxpr_eqns", "stablehlo_lines"} of the train step (traced and lowered, not compiled)."""
  traced = step.trace(state, batch, {})
  return {
    "jaxpr_eqns": jaxpr_eqns(traced.jaxpr.jaxpr),
    "stablehlo_lines": traced.lower().as_text().count("\n"),
  }


def measure_size(args: argparse.Namespace, entry: dict) -> dict:
  config, step, state, batch = make_step(args, entry)
  row = {**entry, "depth": config.model.depth, **program_size(step, state, batch)}
  print(
    f"{entry['model']} depth {row['depth']} scan {entry['scan']}: {row['jaxpr_eqns']} jaxpr "
    f"equations, {row['stablehlo_lines']} StableHLO lines"
  )
  return row


def measure(args: argparse.Namespace, entry: dict) -> dict:
  """Wall and CPU seconds of lowering and of compiling one entry's train step."""
  config, step, state, batch = make_step(args, entry)
  size = program_size(step, state, batch)  # Untimed; a new trace for the timed lowering.
  config, step, state, batch = make_step(args, entry)
  wall, cpu = time.perf_counter(), time.process_time()
  lowered = step.lower(state, batch, {})  # {}: no frozen inputs.
  lower_s, lower_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
  wall, cpu = time.perf_counter(), time.process_time()
  lowered.compile()
  compile_s, compile_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
  m = config.model
  row = {
    **entry,
    "depth": m.depth,
    "hidden_size": m.hidden_size,
    "num_heads": m.num_heads,
    "lower_s": lower_s,
    "compile_s": compile_s,
    "total_s": lower_s + compile_s,
    "lower_cpu_s": lower_cpu_s,
    "compile_cpu_s": compile_cpu_s,
    **size,
  }
  print(
    f"{entry['model']} depth {m.depth} scan {entry['scan']}: lower {lower_s:.1f} s + compile "
    f"{compile_s:.1f} s (CPU {lower_cpu_s + compile_cpu_s:.1f} s)"
  )
  return row


def run(args: argparse.Namespace) -> dict:
  todo = entries(args)
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # Time real compiles only.
  try:
    _, step, state, batch = make_step(args, todo[0])
    step.lower(state, batch, {})  # Untimed: JAX's one-off tracing costs.
    load_before = os.getloadavg()[0]
    rows = [measure(args, entry) for entry in todo]
    load_after = os.getloadavg()[0]
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  total = {(r["model"], r["depth"], r["scan"]): r["total_s"] for r in rows}
  speedup = {
    str(depth): total[model, depth, False] / total[model, depth, True]
    for (model, depth, scan) in total
    if scan and (model, depth, False) in total
  }
  cpus = os.cpu_count() or 1
  return {
    "benchmark": "compile",
    "what": "train step (dit.train.setup's update), jit lower + XLA compile, per entry",
    "tiny": args.tiny,
    "dtype": args.dtype,
    "remat": args.remat,
    "batch": (TINY if args.tiny else FULL)["batch"],
    "entries": rows,
    "unrolled_over_scan_total_s": speedup,  # By depth of the small model.
    "load_average_1min_before": load_before,
    "load_average_1min_after": load_after,
    "cpu_count": cpus,
    "noisy": max(load_before, load_after) > cpus,
    **common.metadata(),
  }


def run_sizes(args: argparse.Namespace) -> dict:
  rows = [measure_size(args, entry) for entry in entries(args)]
  return {
    "benchmark": "compile_program_size",
    "what": "train step (dit.train.setup's update): jaxpr equations and StableHLO lines",
    "tiny": args.tiny,
    "dtype": args.dtype,
    "remat": args.remat,
    "batch": (TINY if args.tiny else FULL)["batch"],
    "entries": rows,
    **common.metadata(),
  }


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.sizes_only:
    result = run_sizes(args)
    if args.out:
      common.write_json(args.out, result)
    return result
  result = run(args)
  if result["noisy"]:
    print(f"noisy: load average above the {result['cpu_count']} CPUs; rerun on an idle machine")
  common.write_json(args.out or os.path.join(common.RESULTS_DIR, "compile.json"), result)
  return result


if __name__ == "__main__":
  main()
