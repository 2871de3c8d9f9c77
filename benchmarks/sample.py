"""Sampling throughput: images/s of the scan sampler with CFG, vs a Python loop of jitted steps.

  python benchmarks/sample.py                       # DiT-XL/2, 64 images, 20/50/250 DDIM steps
  python benchmarks/sample.py --model=S/2 --batch=4 --steps=2,5 --windows=2   # CPU

"scan" is `dit.generate.generate`: the whole sampler is one jitted `lax.scan` with classifier-
free guidance as one model call on a batch of 2B. "loop" runs the same plan's step function,
jitted once, from a Python loop (one dispatch per step), the way a PyTorch pipeline runs.
Both start from the same noise and are checked to give the same images. Parameters are
random (speed does not depend on their values). Compilation is excluded; each figure is the
median over `--windows` windows of `--calls_per_window` full sampling runs.

Writes benchmarks/results/sample_<model>_<dtype>.json unless --out is given.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Repo root.
from benchmarks import common  # noqa: E402
from dit import generate  # noqa: E402
from dit.diffusion import guidance, samplers, schedules  # noqa: E402
from dit.models import dit as dit_model  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="XL/2", help="DiT preset of configs/imagenet256_dit.py")
  p.add_argument("--batch", type=int, default=64, help="images per sampling run")
  p.add_argument("--steps", default="20,50,250", help="comma-separated sampler step counts")
  p.add_argument("--sampler", default="ddim", choices=samplers.SAMPLERS)
  p.add_argument("--cfg_scale", type=float, default=4.0, help="!= 1 doubles the model batch")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--attention", default="xla", help="xla | cudnn | einsum")
  p.add_argument("--overrides", default="", help="config.model fields, e.g. depth=1,num_heads=2")
  p.add_argument("--windows", type=int, default=3)
  p.add_argument("--calls_per_window", type=int, default=1)
  p.add_argument("--no_loop", action="store_true", help="time the scan sampler only")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  return p.parse_args(argv)


def make_loop(config, model, cond, cfg_scale: float, sampler: str, steps: int):
  """sample(params, key) -> images: the plan's steps dispatched one by one from Python."""
  d, m = config.diffusion, config.model
  schedule = schedules.from_config(config.diffusion)
  variance = "learned_range" if m.learn_sigma else "fixed_small"
  plan = samplers.build_plan(schedule, sampler=sampler, steps=steps, variance=variance)
  shape = (cond["label"].shape[0], m.input_size, m.input_size, m.in_channels)

  @jax.jit
  def step(params, carry, info, key):
    model_fn = lambda x, t, c: model.apply({"params": params}, x, t, c)
    denoise = guidance.cfg_denoise(model_fn, cond, cfg_scale)
    predict = samplers.make_predict(denoise, plan.space, d.prediction, m.learn_sigma, None)
    noise = jax.random.normal(jax.random.split(key, 3)[0], shape)  # As samplers.run_plan.
    return plan.step(carry, info, predict, noise)

  @jax.jit
  def start(key):
    # The same split as dit.generate.generate, so that both start from the same x_T.
    noise_key, sample_key = jax.random.split(key)
    x_t = jax.random.normal(noise_key, shape, jnp.float32)
    keys = jax.random.split(jax.random.split(sample_key)[1], plan.num_steps)
    return plan.init(plan.noise_scale * x_t), keys

  infos = [jax.tree.map(lambda a, i=i: a[i], plan.infos) for i in range(plan.num_steps)]

  def run(params, key):
    carry, keys = start(key)
    for i, info in enumerate(infos):
      carry = step(params, carry, info, keys[i])
    return jnp.clip(carry["x"], -1.0, 1.0)

  return run


def run(args: argparse.Namespace) -> dict:
  config = common.dit_config(
    args.model, batch=args.batch, dtype=args.dtype, attention=args.attention, remat=False,
    overrides=args.overrides,
  )  # fmt: skip
  model = dit_model.build_model(config.model)
  x, t, cond = dit_model.example_inputs(model)
  params = jax.jit(model.init)(jax.random.key(0), x, t, cond)["params"]
  num_classes = max(config.model.num_classes, 1)
  cond = {"label": jnp.arange(args.batch, dtype=jnp.int32) % num_classes}
  key = jax.random.key(1)
  rows = []
  for steps in (int(s) for s in args.steps.split(",")):

    def scan(steps=steps):
      return generate.generate(
        config, model, params, cond, key, args.batch,
        sampler=args.sampler, steps=steps, cfg_scale=args.cfg_scale,
      )  # fmt: skip

    fns = {"scan": scan}
    if not args.no_loop:
      loop = make_loop(config, model, cond, args.cfg_scale, args.sampler, steps)
      fns["loop"] = lambda loop=loop: loop(params, key)
    timing = common.time_interleaved(
      fns, windows=args.windows, steps_per_window=args.calls_per_window, warmup=1
    )
    row = {"steps": steps}
    for name, tm in timing.items():
      row[f"{name}_s_per_run"] = tm["s_per_call"]
      row[f"{name}_images_per_s"] = args.batch / tm["s_per_call"]
      row[f"{name}_window_s_per_run"] = tm["window_s_per_call"]
    if not args.no_loop:
      row["loop_over_scan_time"] = row["loop_s_per_run"] / row["scan_s_per_run"]
      diff = jnp.max(jnp.abs(fns["scan"]() - fns["loop"]()))
      row["max_abs_diff_scan_vs_loop"] = float(diff)
    print(row)
    rows.append(row)
  return {
    "benchmark": "sample",
    "model": args.model,
    "config_model": dict(config.model),
    "batch": args.batch,
    "sampler": args.sampler,
    "cfg_scale": args.cfg_scale,
    "model_batch": args.batch * (1 if args.cfg_scale == 1.0 else 2),
    "windows": args.windows,
    "calls_per_window": args.calls_per_window,
    "results": rows,
    **common.metadata(),
  }


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  result = run(args)
  out = args.out or os.path.join(
    common.RESULTS_DIR, f"sample_{args.model.replace('/', '')}_{args.dtype}.json"
  )
  common.write_json(out, result)
  return result


if __name__ == "__main__":
  main()
