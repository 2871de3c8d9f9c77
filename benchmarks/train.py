"""Training throughput: steps/s, images/s, TFLOP/s per device, MFU and peak memory.

  python benchmarks/train.py                          # DiT-XL/2, batch 256, bf16 (accelerator)
  python benchmarks/train.py --model=S/2 --batch=8 --windows=3 --steps_per_window=2   # CPU

Times the train loop's own update step (`dit.train.setup`: diffusion loss, grads,
AdamW, EMA, NaN guard), jitted over a device mesh with the state donated, exactly as
`dit.train` runs it with config.parallelism="mesh". The batch is random latents (B, 32, 32, 4)
and labels already on device, so data loading is excluded. Compilation and `--warmup` steps
are excluded; the figure is the median over `--windows` windows of `--steps_per_window` steps.

FLOPs: `model_tflops` is the model's forward + backward matmul FLOPs from `dit.models.flops`
(counted on the jaxpr, remat recomputation excluded), the usual numerator of MFU; `xla_tflops` is
XLA's cost analysis of the compiled step (everything XLA counts, remat included; custom
calls such as cuDNN attention may be missing from it). MFU = model TFLOP/s per device / the
bf16 peak from dit/hardware.py (null where the peak is unknown, e.g. CPU).

Writes benchmarks/results/train_<model>_<dtype>[_remat].json unless --out is given.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Repo root.
from benchmarks import common  # noqa: E402
from dit import cli, hardware, parallel
from dit import train as train_lib
from dit.models import dit as dit_model
from dit.models import flops


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="XL/2", help="DiT preset of configs/imagenet256_dit.py")
  p.add_argument("--batch", type=int, default=256, help="global batch, split over devices")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--attention", default="xla", help="xla | cudnn | einsum")
  p.add_argument("--remat", action="store_true", help="rematerialise each block")
  p.add_argument("--overrides", default="", help="config.model fields, e.g. depth=1,num_heads=2")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--steps_per_window", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  return p.parse_args(argv)


def model_flops_per_image(config) -> float:
  """Forward + backward FLOPs of one image (dit.models.flops), without remat recomputation."""
  model = dit_model.build_model(dict(config.model, remat=False))
  return flops.model_info(model)["gflops_train"] * 1e9


def make_update(config):
  """(update jitted over a mesh with the state donated, init, abstract state, batch sharding).

  dit.train's own setup with config.parallelism="mesh"; nothing is allocated.
  """
  try:
    s = train_lib.setup(config)
  except cli.UserError as e:
    raise ValueError(str(e)) from e
  return s.step, s.init, s.abstract_state, parallel.batch_sharding(s.mesh)


def abstract_batch(config, sharding) -> dict:
  """Shapes of a batch of latents and labels, for lowering without data."""
  b = config.batch_size
  shape = (b, *train_lib.model_input_shape(config))
  return {
    "latent": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding),
    "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding),
  }


def make_step(config):
  """(jitted update, initial state, random batch on device): ready to time."""
  step, init, _, sharding = make_update(config)
  rng = np.random.default_rng(0)
  spec = abstract_batch(config, sharding)
  batch = {
    "latent": rng.standard_normal(spec["latent"].shape).astype(np.float32),
    "label": rng.integers(0, max(config.model.num_classes, 1), spec["label"].shape),
  }
  batch = {k: jax.device_put(v.astype(spec[k].dtype), sharding) for k, v in batch.items()}
  return step, init(), batch


def run(args: argparse.Namespace) -> dict:
  config = common.dit_config(
    args.model,
    batch=args.batch,
    dtype=args.dtype,
    attention=args.attention,
    remat=args.remat,
    overrides=args.overrides,
  )
  step, state, batch = make_step(config)
  compiled = step.lower(state, batch, {}).compile()  # {}: no frozen inputs.
  stats = common.compiled_stats(compiled)

  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, {})
    return metrics["loss"]

  timing = common.time_median(
    one_step, windows=args.windows, steps_per_window=args.steps_per_window, warmup=args.warmup
  )
  loss = float(jax.device_get(one_step()))
  if not np.isfinite(loss):
    raise FloatingPointError(f"the benchmarked step gave a non-finite loss {loss}")

  n_dev = jax.device_count()
  steps_per_s = 1.0 / timing["s_per_call"]
  model_flops = model_flops_per_image(config) * args.batch / n_dev
  model_tflops = model_flops * steps_per_s / 1e12
  peak = hardware.peak_tflops()
  xla_flops = stats["xla_flops"]
  result = {
    "benchmark": "train_step",
    "model": args.model,
    "config_model": {k: v for k, v in config.model.items()},
    "batch": args.batch,
    "batch_per_device": args.batch // n_dev,
    "windows": args.windows,
    "steps_per_window": args.steps_per_window,
    "warmup": args.warmup,
    "steps_per_s": steps_per_s,
    "images_per_s": steps_per_s * args.batch,
    "window_s_per_step": timing["window_s_per_call"],
    "cpu_s_per_step": timing["cpu_s_per_call"],
    "model_gflops_per_step_per_device": model_flops / 1e9,
    "model_tflops_per_device": model_tflops,
    "xla_gflops_per_step_per_device": None if xla_flops is None else xla_flops / 1e9,
    "xla_tflops_per_device": None if xla_flops is None else xla_flops * steps_per_s / 1e12,
    "peak_tflops_per_device": peak,
    "mfu": None if peak is None else model_tflops / peak,
    "compiled_memory_bytes": stats["memory"],
    "peak_device_memory_bytes": hardware.memory_in_use().get("peak_bytes_in_use"),
    "final_loss": loss,
    **common.metadata(),
  }
  return jax.tree.map(lambda x: x.item() if isinstance(x, np.generic | jnp.ndarray) else x, result)


def default_out(args: argparse.Namespace) -> str:
  name = f"train_{args.model.replace('/', '')}_{args.dtype}"
  name += ("_remat" if args.remat else "") + (
    f"_{args.attention}" if args.attention != "xla" else ""
  )
  return os.path.join(common.RESULTS_DIR, name + ".json")


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  result = run(args)
  print(
    f"{args.model} batch {args.batch} {args.dtype}: {result['steps_per_s']:.3f} steps/s, "
    f"{result['images_per_s']:.1f} img/s, {result['model_tflops_per_device']:.3f} TFLOP/s/device, "
    f"MFU {result['mfu']}"
  )
  common.write_json(args.out or default_out(args), result)
  return result


if __name__ == "__main__":
  main()
