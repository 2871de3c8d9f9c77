"""Side by side with the PyTorch reference: one training step of the same DiT, same batch.

  python benchmarks/vs_pytorch.py                      # DiT-S/2, 32x32x4 latents, batch 8, f32
  python benchmarks/vs_pytorch.py --model=B/2 --batch=32 --dtype=bfloat16   # on a GPU

Both sides time forward + MSE loss + backward + AdamW (lr 1e-4, no weight decay) on the same
random latents, timesteps, labels and targets, in one process:
  ours:    our DiT (Flax), the step jitted as one XLA program, params and optimizer state
           donated.
  pytorch: diffusers' `DiTTransformer2DModel` (the reference our converters load), eager
           `torch.optim.AdamW` (its default foreach implementation).
Windows alternate (ours, pytorch, ours, pytorch, ...) so that other load on a shared machine
hits both alike; each figure is the median over windows. The ratio is ours / pytorch time
per step (< 1: ours is faster). --with_train_step also times dit.train's full update step
(diffusion loss with learned sigma, EMA, NaN guard), which does more work than the plain step.

Note: diffusers' DiT gives every block its own timestep/label embedder (the converted
checkpoint copies the shared one into each block), so it has more parameters for AdamW to
update; the matmul FLOPs are the same to within 0.1%.

--threads=N gives each side N threads (torch.set_num_threads, and XLA's Eigen thread pool via
XLA_FLAGS, set before JAX starts). XLA's CPU runtime keeps threads of its own beyond Eigen's,
so for a true one-core comparison pin the process: `taskset -c 0 python benchmarks/vs_pytorch.py
--threads=1` (the JSON records the CPUs the process may use). A figure counts only on an idle
machine: the 1-minute load average is recorded before and after, and when either reaches the
core count the result is marked "noisy" and written only with --allow_noisy (a ratio taken
under load is noise: one taken at load 15 read 0.41; idle figures: docs/performance.md).

Writes benchmarks/results/vs_pytorch_<model>_<backend>[_<N>threads].json unless --out is given.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Repo root.
from benchmarks import common  # noqa: E402
from dit.models import dit as dit_model  # noqa: E402

LR = 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="S/2", help="DiT preset of configs/imagenet256_dit.py")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--attention", default="xla", help="ours: xla | cudnn | einsum")
  p.add_argument("--overrides", default="", help="config.model fields, e.g. depth=1,num_heads=2")
  p.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
  p.add_argument("--threads", type=int, default=0, help="N threads for both sides (0: defaults)")
  p.add_argument("--allow_noisy", action="store_true", help="write a result taken under load")
  p.add_argument("--torch_device", default="cpu", help="cpu | cuda")
  p.add_argument("--with_train_step", action="store_true", help="also time dit.train's update")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--steps_per_window", type=int, default=2)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  return p.parse_args(argv)


def make_batch(m, batch: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  s, c = m.input_size, m.in_channels
  c_out = 2 * c if m.learn_sigma else c
  return {
    "x": rng.standard_normal((batch, s, s, c)).astype(np.float32),
    "t": rng.integers(0, 1000, (batch,)).astype(np.int32),
    "label": rng.integers(0, m.num_classes, (batch,)).astype(np.int32),
    "target": rng.standard_normal((batch, s, s, c_out)).astype(np.float32),
  }


def ours_step(m, data: dict[str, np.ndarray]):
  """step() -> loss: our DiT's jitted forward + backward + AdamW, state donated."""
  model = dit_model.build_model(m)
  tx = optax.adamw(LR, weight_decay=0.0)
  batch = {k: jnp.asarray(v) for k, v in data.items()}
  x1, t1, label1 = batch["x"][:1], batch["t"][:1], batch["label"][:1]
  params = jax.jit(model.init)(jax.random.key(0), x1, t1, {"label": label1})["params"]

  def loss_fn(params, batch):
    out = model.apply({"params": params}, batch["x"], batch["t"], {"label": batch["label"]})
    return jnp.mean((out - batch["target"]) ** 2)

  def update(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  update = jax.jit(update, donate_argnums=(0, 1))
  holder = [params, jax.jit(tx.init)(params)]

  def step():
    holder[0], holder[1], loss = update(*holder, batch)
    return loss

  num_params = sum(p.size for p in jax.tree.leaves(params))
  return step, num_params


def ours_train_step(config):
  """step() -> loss: dit.train's whole update (see benchmarks/train.py)."""
  from benchmarks import train as train_bench

  step_fn, state, batch = train_bench.make_step(config)
  compiled = step_fn.lower(state, batch, {}).compile()  # {}: no frozen inputs.
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch, {})
    return metrics["loss"]

  return step


def torch_step(m, data: dict[str, np.ndarray], device: str, dtype: str):
  """step() -> loss: diffusers DiTTransformer2DModel forward + backward + AdamW."""
  import torch
  from diffusers import DiTTransformer2DModel

  torch.manual_seed(0)
  heads = m.num_heads
  model = DiTTransformer2DModel(
    num_attention_heads=heads,
    attention_head_dim=m.hidden_size // heads,
    in_channels=m.in_channels,
    out_channels=2 * m.in_channels if m.learn_sigma else m.in_channels,
    num_layers=m.depth,
    sample_size=m.input_size,
    patch_size=m.patch_size,
    num_embeds_ada_norm=m.num_classes,
  ).to(device)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)
  x, target = nchw(data["x"]), nchw(data["target"])
  t = torch.from_numpy(data["t"].astype(np.int64)).to(device)
  label = torch.from_numpy(data["label"].astype(np.int64)).to(device)
  autocast = dtype == "bfloat16"

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
      out = model(x, timestep=t, class_labels=label).sample
    loss = torch.mean((out.float() - target) ** 2)
    loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
    return loss.detach()

  num_params = sum(p.numel() for p in model.parameters())
  return step, num_params, torch.get_num_threads()


def set_xla_threads(n: int) -> None:
  """Eigen's threads on (n > 1) or off (n = 1); only before JAX's backend starts."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags += f" --xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'}"
  os.environ["XLA_FLAGS"] = flags.strip()


def noisy(load_before: float, load_after: float, cpus: int) -> bool:
  """Whether a timing was taken under load: the 1-minute load reached the core count."""
  return max(load_before, load_after) >= cpus


def run(args: argparse.Namespace) -> dict:
  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  elif args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  config = common.dit_config(
    args.model, batch=args.batch, dtype=args.dtype, attention=args.attention, remat=False,
    overrides=args.overrides,
  )  # fmt: skip
  m = config.model
  data = make_batch(m, args.batch)
  ours, ours_params = ours_step(m, data)
  ref, ref_params, threads = torch_step(m, data, args.torch_device, args.dtype)
  fns = {"ours": ours, "pytorch": ref}
  if args.with_train_step:
    fns["ours_train_step"] = ours_train_step(config)
  load_before = os.getloadavg()[0]
  timing = common.time_interleaved(
    fns, windows=args.windows, steps_per_window=args.steps_per_window, warmup=args.warmup
  )
  load_after = os.getloadavg()[0]
  s_ours, s_ref = timing["ours"]["s_per_call"], timing["pytorch"]["s_per_call"]
  result = {
    "benchmark": "vs_pytorch",
    "model": args.model,
    "config_model": dict(m),
    "batch": args.batch,
    "dtype": args.dtype,
    "step": "forward + MSE + backward + AdamW(lr=1e-4, wd=0)",
    "windows": args.windows,
    "steps_per_window": args.steps_per_window,
    "warmup": args.warmup,
    "ours_s_per_step": s_ours,
    "pytorch_s_per_step": s_ref,
    "ratio_ours_over_pytorch": s_ours / s_ref,
    "ours_images_per_s": args.batch / s_ours,
    "pytorch_images_per_s": args.batch / s_ref,
    "ours_cpu_s_per_step": timing["ours"]["cpu_s_per_call"],
    "pytorch_cpu_s_per_step": timing["pytorch"]["cpu_s_per_call"],
    "cpu_time_ratio_ours_over_pytorch": (
      timing["ours"]["cpu_s_per_call"] / timing["pytorch"]["cpu_s_per_call"]
    ),
    "window_s_per_step": {k: v["window_s_per_call"] for k, v in timing.items()},
    "ours_params": int(ours_params),
    "pytorch_params": int(ref_params),
    "torch_device": args.torch_device,
    "torch_threads": threads,
    "threads_per_side": args.threads or None,
    "cpus_allowed": len(os.sched_getaffinity(0)),
    "load_average_1min_before": load_before,
    "load_average_1min_after": load_after,
    "noisy": noisy(load_before, load_after, os.cpu_count() or 1),
    **common.metadata(),
  }
  if args.with_train_step:
    result["ours_train_step_s_per_step"] = timing["ours_train_step"]["s_per_call"]
  return result


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.threads:
    set_xla_threads(args.threads)
  result = run(args)
  print(
    f"{args.model} batch {args.batch} {args.dtype}: ours {result['ours_s_per_step'] * 1e3:.1f} ms,"
    f" pytorch {result['pytorch_s_per_step'] * 1e3:.1f} ms, "
    f"ratio {result['ratio_ours_over_pytorch']:.3f} (CPU-time ratio "
    f"{result['cpu_time_ratio_ours_over_pytorch']:.3f}; load {load_before_after(result)})"
  )
  if result["noisy"] and not args.allow_noisy:
    print("not written: the machine was loaded (pass --allow_noisy to keep it, marked noisy)")
    return result
  suffix = f"_{args.threads}threads" if args.threads else ""
  out = args.out or os.path.join(
    common.RESULTS_DIR,
    f"vs_pytorch_{args.model.replace('/', '')}_{jax.default_backend()}{suffix}.json",
  )
  common.write_json(out, result)
  return result


def load_before_after(result: dict) -> str:
  return f"{result['load_average_1min_before']:.1f} -> {result['load_average_1min_after']:.1f}"


if __name__ == "__main__":
  main()
