"""Sampler benchmark: error vs NFE on an analytic Gaussian case, and scan vs Python-loop speed.

1. Data x0 ~ N(MU, VAR I): the exact eps-predictor is known in closed form, and so is the
   probability-flow ODE map x_T -> x_0 (affine). Deterministic samplers are scored by the RMS
   distance to that exact solution from the same x_T; stochastic ones (registry entries with
   deterministic=False: ddpm, euler_ancestral, dpmpp_2m_sde, lcm) by the error of the sample
   mean and variance, over many samples.
   The flow samplers (dit.diffusion.flow_samplers) are scored the same way on the linear
   (rectified-flow) path with the exact velocity of the same Gaussian data.
2. Time per sample on a randomly initialised digits-sized DiT (16x16x1, patch 2, hidden 128,
   depth 4, 4 heads, 10 classes): `sample` jitted as one lax.scan, vs a Python loop calling a
   jitted step function (the same `plan.step`) once per step.

  python benchmarks/samplers.py [--out benchmarks/results/samplers.json] [--analytic_only]
Writes JSON and a PNG plot (same name, .png).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dit.diffusion import flow, flow_samplers, samplers, schedules

MU, VAR = 0.5, 0.25
STEPS = (5, 10, 20, 40, 80, 160)


def analytic_errors(num: int) -> dict:
  schedule = schedules.make_schedule()
  den = schedules.gaussian_eps_predictor(schedule, MU, VAR)
  x_T = jax.random.normal(jax.random.key(0), (num, 1))
  exact = schedules.gaussian_ode_solution(schedule, x_T, MU, VAR)
  out = {}
  for name, spec in samplers.SAMPLERS.items():
    rows = []
    for steps in STEPS:
      settings = samplers.SamplerSettings(sampler=name, steps=steps)
      try:
        settings.check(schedule.T)
      except ValueError:  # e.g. LCM takes at most LCM_MAX_STEPS steps
        continue
      nfe = samplers.build_plan(schedule, settings).num_steps
      run = jax.jit(functools.partial(samplers.sample, den, settings=settings))
      x = np.asarray(run(x_T, jax.random.key(1), schedule), np.float64)
      moment_err = abs(x.mean() - MU) + abs(x.var() - VAR)
      row = {"steps": steps, "nfe": nfe, "moment_error": float(moment_err)}
      if spec.deterministic:
        row["ode_rms_error"] = float(np.sqrt(np.mean((x - exact) ** 2)))
      rows.append(row)
    out[name] = rows
    print(name, [(r["nfe"], r.get("ode_rms_error", r["moment_error"])) for r in rows])
  return out


def flow_analytic_errors(num: int) -> dict:
  """Error vs NFE of each flow sampler on the linear path (exact velocity of N(MU, VAR))."""
  fl = flow.Flow()
  model = flow.gaussian_model(fl, MU, VAR)
  x_T = jax.random.normal(jax.random.key(0), (num, 1))
  out = {}
  for name, spec in flow_samplers.FLOW_SAMPLERS.items():
    rows = []
    for steps in STEPS:
      settings = flow_samplers.FlowSamplerSettings(sampler=name, steps=steps)
      plan = flow_samplers.build_plan(fl, settings)
      run = jax.jit(functools.partial(flow_samplers.sample, model, flow=fl, settings=settings))
      x = np.asarray(run(x_T, jax.random.key(1)), np.float64)
      t0 = float(plan.infos["tau"][0])
      exact = flow.gaussian_ode_solution(fl, x_T, t0, MU, VAR)
      row = {"steps": steps, "nfe": plan.num_steps}
      row["moment_error"] = float(abs(x.mean() - MU) + abs(x.var() - VAR))
      if spec.deterministic:
        row["ode_rms_error"] = float(np.sqrt(np.mean((x - exact) ** 2)))
      rows.append(row)
    out[name] = rows
    print("flow", name, [(r["nfe"], r.get("ode_rms_error", r["moment_error"])) for r in rows])
  return out


def _time(fn, repeats: int) -> float:
  fn()  # compile / warm up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def speed(batch: int, steps: int, repeats: int) -> list[dict]:
  from dit.models.dit import DiT

  model = DiT(
    input_size=16,
    patch_size=2,
    in_channels=1,
    hidden_size=128,
    depth=4,
    num_heads=4,
    num_classes=10,
    learn_sigma=True,
  )
  x_T = jax.random.normal(jax.random.key(0), (batch, 16, 16, 1))
  labels = jnp.arange(batch) % 10
  params = model.init(jax.random.key(1), x_T, jnp.zeros((batch,)), {"label": labels})
  schedule = schedules.make_schedule()

  def denoise(x, t):
    return model.apply(params, x, t, {"label": labels})

  rows = []
  for name in ("ddim", "ddpm", "dpmpp_2m", "heun"):
    settings = samplers.SamplerSettings(sampler=name, steps=steps, variance="learned_range")
    scan = jax.jit(
      lambda x, k, s=settings: samplers.sample(denoise, x, k, schedule, s, learn_sigma=True)
    )
    t_scan = _time(lambda scan=scan: scan(x_T, jax.random.key(2)).block_until_ready(), repeats)

    plan = samplers.build_plan(schedule, settings)
    predict = samplers.make_predict(denoise, plan.space, "eps", True, None)
    keys = jax.random.split(jax.random.key(2), plan.num_steps)

    @jax.jit
    def step(carry, info, key, plan=plan, predict=predict):
      return plan.step(carry, info, predict, jax.random.normal(key, x_T.shape))

    infos = [jax.tree.map(lambda a, i=i: a[i], plan.infos) for i in range(plan.num_steps)]

    def loop(plan=plan, infos=infos, keys=keys, step=step):
      carry = plan.init(plan.noise_scale * x_T)
      for info, key in zip(infos, keys, strict=True):
        carry = step(carry, info, key)
      return carry["x"].block_until_ready()

    t_loop = _time(loop, repeats)
    row = {
      "sampler": name,
      "steps": steps,
      "nfe": plan.num_steps,
      "batch": batch,
      "scan_s_per_sample": t_scan / batch,
      "loop_s_per_sample": t_loop / batch,
      "loop_over_scan": t_loop / t_scan,
    }
    rows.append(row)
    print(row)
  return rows


def plot(errors: dict, path: str, flow_errors: dict | None = None) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3 if flow_errors else 2, figsize=(18 if flow_errors else 12, 4.5))
  for name, rows in (flow_errors or {}).items():
    x = [r["nfe"] for r in rows]
    key = "ode_rms_error" if flow_samplers.FLOW_SAMPLERS[name].deterministic else "moment_error"
    axes[2].loglog(
      x, [r[key] for r in rows], "o-", label=name + ("" if key[0] == "o" else " (moments)")
    )
  if flow_errors:
    axes[2].set(xlabel="NFE", ylabel="RMS error vs exact ODE solution", title="flow samplers")
  for name, rows in errors.items():
    x = [r["nfe"] for r in rows]
    if not samplers.SAMPLERS[name].deterministic:
      axes[1].loglog(x, [r["moment_error"] for r in rows], "o-", label=name)
    else:
      axes[0].loglog(x, [r["ode_rms_error"] for r in rows], "o-", label=name)
  ref = np.array([5, 300.0])
  axes[0].loglog(ref, 0.3 * (ref / 5) ** -1.0, "k:", lw=1, label="slope -1")
  axes[0].loglog(ref, 0.05 * (ref / 5) ** -2.0, "k--", lw=1, label="slope -2")
  axes[0].set(xlabel="NFE", ylabel="RMS error vs exact ODE solution", title="ODE samplers")
  axes[1].set(
    xlabel="NFE", ylabel="|mean - mu| + |var - s^2|", title="stochastic samplers (moments)"
  )
  for ax in axes:
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
  fig.suptitle(
    f"Gaussian data N({MU}, {VAR}); exact eps-predictor on the linear schedule (T=1000), "
    "exact velocity on the linear flow path"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="benchmarks/results/samplers.json")
  parser.add_argument("--num", type=int, default=20000, help="samples for the analytic case")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--analytic_only", action="store_true", help="keep the speed rows of the existing --out"
  )
  args = parser.parse_args()

  errors = analytic_errors(args.num)
  flow_errors = flow_analytic_errors(args.num)
  if args.analytic_only:
    with open(args.out) as f:
      timing = json.load(f)["speed_digits_dit"]
  else:
    timing = speed(args.batch, args.steps, args.repeats)
  result = {
    "analytic": {"mu": MU, "var": VAR, "num_samples": args.num, "errors": errors},
    "flow_analytic": {"path": "linear", "target": "velocity", "errors": flow_errors},
    "speed_digits_dit": timing,
    "device": str(jax.devices()[0]),
    "platform": platform.platform(),
    "jax": jax.__version__,
    "note": "CPU timings on a shared 2-core machine; compare ratios, not absolute numbers.",
  }
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  plot(errors, os.path.splitext(args.out)[0] + ".png", flow_errors)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
