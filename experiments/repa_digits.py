"""REPA on digits: the demo with and without alignment to a digits encoder, at equal steps.

  python -m experiments.digits_encoder --out=runs/digits_encoder
  python -m experiments.repa_digits --encoder=runs/digits_encoder --workdir=runs/repa_digits \
      --out=docs/repa/digits

Two arms of configs/digits_repa.py (the demo's model, data, optimizer and 2000 steps): REPA
(the tokens after block 2 of 4 aligned with the encoder's patch features, lambda 0.5) and the
same run with model.repa_block=0 (plain digits demo), each with seeds 0 and 1. Every 250 steps
the EMA model is scored (conditional accuracy and digits FD on 1000 DDIM-50 samples, guidance
4). Writes <out>.json, <out>.md (the table) and <out>.png; rerunning resumes (experiments/sweep.py).

The speed-up at a step s is how many times more steps the plain run needs to reach REPA's
accuracy (or digits FD) at s (seed means, interpolated in log steps between evaluations);
"none" where REPA is no better at s or the plain run had got there sooner, "> 2000 / s" where
the plain run never gets there.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from experiments import plots, sweep

STEPS = (250, 500, 1000, 2000)  # Where the table reports.
SEEDS = (0, 1)
COMMON = {
  "total_steps": 2000,
  "log_every": 50,
  "ckpt_every": 2000,
  "sample_every": 0,
  "progress_bar": False,
  "sample.num": 0,
  "eval.every": 250,
  "eval.num_samples": 1000,
  "eval.batch_size": 500,
}
ARMS = {"no REPA": {"model.repa_block": 0}, "REPA": {}}
METRICS = ("accuracy", "digits_fd")


def curve(workdir: str) -> dict[str, list]:
  """{"step": [...], "accuracy": [...], "digits_fd": [...], "repa_align": [...]} of a run."""
  rows = [r for r in sweep.read_metrics(workdir) if "eval/accuracy" in r]
  out = {"step": [r["step"] for r in rows]}
  for m in METRICS:
    out[m] = [r[f"eval/{m}"] for r in rows]
  out["repa_align"] = [r.get("repa_align") for r in rows]
  return out


def steps_to_reach(steps, values, target: float, higher: bool = False) -> float | None:
  """The first step (log-linear between evaluations) where the curve reaches `target`
  (<= target for FD; >= target with `higher`, for accuracy); None if it never does."""
  sign = -1.0 if higher else 1.0
  values, target = [sign * v for v in values], sign * target
  for i, value in enumerate(values):
    if value <= target:
      if i == 0 or value == target:
        return float(steps[i])
      s0, s1, v0 = steps[i - 1], steps[i], values[i - 1]
      frac = (v0 - target) / (v0 - value)
      return float(np.exp(np.log(s0) + frac * (np.log(s1) - np.log(s0))))
  return None


def speedup(plain: dict, aligned: dict, metric: str, step: int) -> float | str:
  """How many times more steps the plain run needs to reach REPA's `metric` at `step`:
  "none" where REPA is no better there or the plain run had got there sooner, "> x" where the
  plain run never gets there."""
  higher = metric == "accuracy"
  target = aligned[metric][aligned["step"].index(step)]
  at_step = plain[metric][plain["step"].index(step)]
  if (target <= at_step) if higher else (target >= at_step):
    return "none"
  reached = steps_to_reach(plain["step"], plain[metric], target, higher=higher)
  if reached is None:
    return f"> {plain['step'][-1] / step:g}"
  return round(reached / step, 2) if reached > step else "none"


def summarise(records: list[dict]) -> dict:
  """Seed means and spreads per arm at every evaluated step, and the speed-ups at STEPS."""
  arms = {}
  for name in ARMS:
    runs = [r for r in records if r["arm"] == name and r["status"] == "finished"]
    if not runs:
      continue
    steps = runs[0]["curve"]["step"]
    arm = {"step": steps, "seeds": len(runs)}
    for m in METRICS:
      values = np.array([r["curve"][m] for r in runs])
      arm[m] = values.mean(0).tolist()
      arm[m + "_min"], arm[m + "_max"] = values.min(0).tolist(), values.max(0).tolist()
    arms[name] = arm
  speedups = {m: {} for m in METRICS}
  if len(arms) == len(ARMS):
    plain, aligned = arms["no REPA"], arms["REPA"]
    for m in METRICS:
      for s in STEPS:
        if s in aligned["step"] and s in plain["step"]:
          speedups[m][str(s)] = speedup(plain, aligned, m, s)
  return {"arms": arms, "speedup": speedups}


def run(encoder: str, root: str, out: str) -> dict:
  base = sweep.apply_overrides(
    sweep.load_base("configs/digits_repa.py"), {**COMMON, "repa.encoder_path": encoder}
  )
  records = []
  for name, arm in ARMS.items():
    for seed in SEEDS:
      r = sweep.run_arm(base, {**arm, "seed": seed}, root, evaluate=False)
      r.update(arm=name, seed=seed, curve=curve(r["workdir"]))
      records.append(r)
      last = r["curve"]
      if last["step"]:
        print(
          f"{name} seed {seed}: step {last['step'][-1]} acc {last['accuracy'][-1]:.3f} "
          f"FD {last['digits_fd'][-1]:.2f}",
          flush=True,
        )
  results = {"common": COMMON, "encoder": encoder, "records": records, **summarise(records)}
  write(results, out)
  return results


def write(results: dict, out: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(results, f, indent=2)
  arms = results["arms"]
  lines = [
    "| steps | accuracy, no REPA | accuracy, REPA | digits FD, no REPA | digits FD, REPA | "
    "speed-up (accuracy) | speed-up (FD) |",
    "|---|---|---|---|---|---|---|",
  ]
  for s in STEPS:
    cells = [str(s)]
    for m, fmt in (("accuracy", "{:.3f}"), ("digits_fd", "{:.2f}")):
      for name in ARMS:
        arm = arms.get(name)
        if arm and s in arm["step"]:
          i = arm["step"].index(s)
          lo, hi = arm[m + "_min"][i], arm[m + "_max"][i]
          cells.append(f"{fmt.format(arm[m][i])} ({fmt.format(lo)}-{fmt.format(hi)})")
        else:
          cells.append("-")
    for m in METRICS:
      cells.append(str(results["speedup"][m].get(str(s), "-")))
    lines.append("| " + " | ".join(cells) + " |")
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(results, out + ".png")


def plot(results: dict, path: str) -> None:
  """Digits FD and accuracy against training steps: seed means, the band between seeds."""
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for name, arm in results["arms"].items():
    for ax, m in zip(axes, METRICS, strict=True):
      (line,) = ax.plot(arm["step"], arm[m], "o-", ms=3, label=name)
      ax.fill_between(
        arm["step"], arm[m + "_min"], arm[m + "_max"], color=line.get_color(), alpha=0.2
      )
  labels = {"accuracy": "cond. accuracy ↑", "digits_fd": "digits FD ↓"}
  for ax, m in zip(axes, METRICS, strict=True):
    ax.set(xlabel="training steps", ylabel=labels[m], xscale="log")
    ax.set_xticks(STEPS, [str(s) for s in STEPS])
    ax.minorticks_off()
  axes[0].legend(fontsize=8)
  plots.save(fig, path)


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("encoder", "runs/digits_encoder", "The digits encoder (DINOv2 format).")
  flags.DEFINE_string("workdir", "runs/repa_digits", "Root of the per-run workdirs.")
  flags.DEFINE_string("out", "docs/repa/digits", "Output prefix (.json, .md, .png).")


def main(argv):
  del argv
  from dit.models import dinov2

  dinov2.check_model_dir(FLAGS.encoder)  # Before any training: the encoder must exist.
  run(FLAGS.encoder, FLAGS.workdir, FLAGS.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
