"""The accelerator suite: one GPU or TPU, under 8 minutes of wall time, compiles included.

  bash benchmarks/accelerator.sh            # = python benchmarks/accelerator.py
  python benchmarks/accelerator.py --tiny   # the CPU smoke test: tiny model, 2 steps, seconds

Sections, each with a time budget inside the run's (--budget_s, 430 s: start-up and slack fit
in 8 minutes). An item is skipped, with the reason recorded, when its section's time left
is less than the previous item took (twice that for unrolled blocks, which compile slower),
a section when the run has less left than the section's minimum; a started item is not
interrupted, so the order puts the likely best first:
  train    DiT-XL/2 bf16, the train loop's own update step (benchmarks/train.py, i.e.
           dit.train.setup): images/s, model TFLOP/s per device, MFU, compiled and peak device
           memory, for scan / remat variants and each attention implementation the device
           has (xla; cudnn on NVIDIA GPUs), at the largest per-device batch of --batches
           that fits (an out-of-memory error tries the next). Unrolled variants last: they
           compile slowest.
  sample   the one-lax.scan sampler vs a Python loop of jitted steps, 50 DDIM steps with CFG
           (benchmarks/sample.py).
  pytorch  diffusers' DiTTransformer2DModel train step in bf16 autocast
           (benchmarks/vs_pytorch.py), only if torch.cuda.is_available(), at the largest of
           --pytorch_batches (128, 64, 32) that fits.
MFU = model TFLOP/s (dit.models.flops: forward + backward matmuls, remat recomputation not
counted) / the bf16 peak of dit/hardware.py (H100 SXM and H200 989, A100 312, TPU v4 275,
v5e 197, v5p 459 TFLOP/s); null for a device not in the table.

Writes benchmarks/results/accelerator_<device kind>.json unless --out is given.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
import traceback
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Repo root.
from benchmarks import common, vs_pytorch  # noqa: E402
from benchmarks import sample as sample_bench  # noqa: E402
from benchmarks import train as train_bench  # noqa: E402
from dit import hardware  # noqa: E402

# name -> config.model settings, in the order they run (the likely fastest first).
VARIANTS = {
  "scan_remat": {"scan": True, "remat": True},
  "scan": {"scan": True},
  "unrolled": {},  # The configs' default.
  "unrolled_remat": {"remat": True},
}
TINY_VARIANTS = ("unrolled", "scan_remat")
# What a train row keeps of benchmarks/train.py's result. peak_device_memory_bytes is the
# process's peak so far (device memory_stats; null on a CPU); compiled_memory_bytes is this
# program's own (XLA's memory analysis).
TRAIN_KEYS = (
  "batch", "batch_per_device", "images_per_s", "steps_per_s", "window_s_per_step",
  "model_tflops_per_device", "xla_tflops_per_device", "peak_tflops_per_device", "mfu",
  "compiled_memory_bytes", "peak_device_memory_bytes", "final_loss",
)  # fmt: skip
# min_s: the least time a section starts with (two XL/2 compiles for the sampler, a diffusers
# XL/2 build and a few steps for PyTorch).
FULL = dict(model="XL/2", overrides="", dtype="bfloat16", batches="256,128,64,32", windows=3,
            steps_per_window=5, warmup=2, sample_batch=32, sample_steps=50,
            pytorch_batches="128,64,32", sample_min_s=40.0, pytorch_min_s=30.0)  # fmt: skip
TINY = dict(model="S/8", overrides="depth=1,hidden_size=32,num_heads=2,input_size=8",
            dtype="float32", batches="2", windows=1, steps_per_window=2, warmup=0,
            sample_batch=2, sample_steps=2, pytorch_batches="2", sample_min_s=0.0,
            pytorch_min_s=0.0)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny model, 2 steps: the CPU smoke test")
  p.add_argument("--batches", default=None, help="per-device batches to try, largest first")
  p.add_argument("--variants", default=None, help=f"comma-separated names of {list(VARIANTS)}")
  p.add_argument("--attention", default=None, help="default: xla, and cudnn on NVIDIA GPUs")
  p.add_argument("--pytorch_batches", default=None, help="per-device batches for diffusers")
  # Seconds: the whole run (leaving start-up and slack inside 8 minutes), and each section's
  # share; a section gets at most what the run has left, and is skipped below its minimum.
  p.add_argument("--budget_s", type=float, default=430.0)
  p.add_argument("--train_budget_s", type=float, default=290.0)
  p.add_argument("--sample_budget_s", type=float, default=80.0)
  p.add_argument("--pytorch_budget_s", type=float, default=60.0)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  args = p.parse_args(argv)
  for key, value in (TINY if args.tiny else FULL).items():  # A flag given wins.
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  args.variants = args.variants or ",".join(TINY_VARIANTS if args.tiny else VARIANTS)
  return args


def attention_impls(args: argparse.Namespace) -> list[str]:
  """xla everywhere; cudnn (flash attention, bf16 only) on NVIDIA GPUs (dit/models/attention)."""
  if args.attention:
    return [a.strip() for a in args.attention.split(",")]
  gpu = jax.default_backend() == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower()
  return ["xla"] + (["cudnn"] if gpu and args.dtype == "bfloat16" else [])


def is_oom(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


class Budget:
  """A section's seconds. An item starts only if the time left covers what it is expected to
  take: the previous item's time (times `factor`), and at least `min_s`."""

  def __init__(self, seconds: float, min_s: float = 0.0):
    self.seconds, self.min_s = seconds, min_s
    self.start, self.last = time.perf_counter(), 0.0

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.start)

  def skip_reason(self, factor: float = 1.0) -> str | None:
    left, expected = self.left(), max(self.last * factor, self.min_s)
    if left <= 0 or left < expected:
      return (
        f"over budget: {max(left, 0):.0f} s left of {self.seconds:.0f} s, {expected:.0f} s expected"
      )
    return None

  def run(self, fn, *a) -> dict:
    """fn(*a), timed; an exception is recorded (with its last lines), not raised."""
    start = time.perf_counter()
    try:
      out = fn(*a)
    except Exception as e:  # One broken item must not lose the others' figures.
      out = {"error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": _tail()}
    self.last = time.perf_counter() - start
    return {**out, "elapsed_s": self.last}


def _tail() -> str:
  return "".join(traceback.format_exc().splitlines(keepends=True)[-6:])


def _free():
  gc.collect()
  jax.clear_caches()  # Compiled programs of the last item hold no device memory after this.


def train_item(args: argparse.Namespace, settings: dict, attention: str) -> dict:
  """benchmarks/train.py at the largest batch of args.batches (per device) that fits."""
  overrides = [args.overrides] if args.overrides else []
  overrides += [f"{k}={str(v).lower()}" for k, v in settings.items() if k != "remat"]
  attempts = []
  for per_device in (int(b) for b in args.batches.split(",")):
    batch = per_device * jax.device_count()
    argv = [
      f"--model={args.model}", f"--batch={batch}", f"--dtype={args.dtype}",
      f"--attention={attention}", f"--overrides={','.join(overrides)}",
      f"--windows={args.windows}", f"--steps_per_window={args.steps_per_window}",
      f"--warmup={args.warmup}",
    ] + (["--remat"] if settings.get("remat") else [])  # fmt: skip
    try:
      result = train_bench.run(train_bench.parse_args(argv))
    except Exception as e:
      if not is_oom(e):
        raise
      attempts.append({"batch_per_device": per_device, "error": "out of memory"})
      _free()
      continue
    _free()
    return {**{k: result[k] for k in TRAIN_KEYS}, "attempts": attempts}
  return {"error": f"no batch of {args.batches} per device fits", "attempts": attempts}


def train_section(args: argparse.Namespace, budget: Budget) -> list[dict]:
  rows = []
  for name in (v.strip() for v in args.variants.split(",")):
    for attention in attention_impls(args):
      settings = VARIANTS[name]
      row = {"variant": name, "scan": False, "remat": False, **settings, "attention": attention}
      # Unrolled blocks compile about twice as long as scanned ones (benchmarks/compile.py).
      reason = budget.skip_reason(1.0 if settings.get("scan") else 2.0)
      if reason:
        rows.append({**row, "skipped": reason})
        continue
      row.update(budget.run(train_item, args, settings, attention))
      print("train", {k: row.get(k) for k in ("variant", "attention", "batch", "images_per_s")})
      rows.append(row)
  return rows


def sample_section(args: argparse.Namespace, budget: Budget) -> dict:
  reason = budget.skip_reason()
  if reason:
    return {"skipped": reason}
  argv = [
    f"--model={args.model}", f"--batch={args.sample_batch}", f"--steps={args.sample_steps}",
    "--cfg_scale=4.0", f"--dtype={args.dtype}", "--windows=2",
    # Scanned blocks: the sampler's two programs (scan, loop step) compile faster.
    f"--overrides={','.join(o for o in (args.overrides, 'scan=true') if o)}",
  ]  # fmt: skip

  def run():
    r = sample_bench.run(sample_bench.parse_args(argv))
    (row,) = r["results"]
    return {"batch": r["batch"], "model_batch": r["model_batch"], "sampler": r["sampler"], **row}

  out = budget.run(run)
  _free()
  return out


def pytorch_section(args: argparse.Namespace, budget: Budget) -> dict:
  try:
    import torch
  except ImportError:
    return {"skipped": "torch is not installed"}
  if not torch.cuda.is_available():
    return {"skipped": "torch.cuda.is_available() is False"}
  reason = budget.skip_reason()
  if reason:
    return {"skipped": reason}

  def run():
    config = common.dit_config(
      args.model, batch=1, dtype=args.dtype, attention="xla", remat=False,
      overrides=args.overrides,
    )  # fmt: skip
    attempts = []
    for batch in (int(b) for b in args.pytorch_batches.split(",")):
      try:
        data = vs_pytorch.make_batch(config.model, batch)
        step, params, _ = vs_pytorch.torch_step(config.model, data, "cuda", args.dtype)
        timing = common.time_median(
          step, windows=args.windows, steps_per_window=args.steps_per_window, warmup=2
        )
      except Exception as e:
        if not is_oom(e):
          raise
        attempts.append({"batch": batch, "error": "out of memory"})
        gc.collect()
        torch.cuda.empty_cache()
        continue
      return {
        "batch": batch,
        "images_per_s": batch / timing["s_per_call"],
        "window_s_per_step": timing["window_s_per_call"],
        "params": int(params),
        "autocast_bf16": args.dtype == "bfloat16",
        "attempts": attempts,
      }
    return {"error": f"no batch of {args.pytorch_batches} fits", "attempts": attempts}

  return budget.run(run)


def device_name() -> str:
  return re.sub(r"[^a-z0-9]+", "_", jax.devices()[0].device_kind.lower()).strip("_")


def run(args: argparse.Namespace) -> dict:
  run_budget = Budget(args.budget_s)
  share = lambda seconds, min_s=0.0: Budget(max(0.0, min(seconds, run_budget.left())), min_s)
  train = train_section(args, share(args.train_budget_s))
  sample = sample_section(args, share(args.sample_budget_s, args.sample_min_s))
  pytorch = pytorch_section(args, share(args.pytorch_budget_s, args.pytorch_min_s))
  done = [r for r in train if "images_per_s" in r]
  best = max(done, key=lambda r: r["images_per_s"], default=None)
  if best and "images_per_s" in pytorch:
    pytorch["ours_best_over_pytorch_images_per_s"] = best["images_per_s"] / pytorch["images_per_s"]
  return {
    "benchmark": "accelerator",
    "tiny": args.tiny,
    "model": args.model,
    "overrides": args.overrides,
    "dtype": args.dtype,
    "batches_per_device": args.batches,
    "peak_tflops_per_device": hardware.peak_tflops(),
    "budgets_s": {
      "train": args.train_budget_s,
      "sample": args.sample_budget_s,
      "pytorch": args.pytorch_budget_s,
    },  # fmt: skip
    "train": train,
    "best_train": None if best is None else {k: best[k] for k in ("variant", "attention")},
    "sample": sample,
    "pytorch": pytorch,
    "wall_s": time.perf_counter() - run_budget.start,
    **common.metadata(),
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  result = jax.tree.map(lambda x: x.item() if isinstance(x, np.generic) else x, run(args))
  out = args.out or os.path.join(common.RESULTS_DIR, f"accelerator_{device_name()}.json")
  common.write_json(out, result)
  print(f"{result['wall_s']:.0f} s; best train: {result['best_train']}")
  return result


if __name__ == "__main__":
  main()
