"""Flow matching against eps prediction on digits, at the same training compute.

  python -m experiments.flow_vs_eps --workdir=runs/flow_vs_eps --out=docs/flow_matching/digits

Three models train for the demo's 2000 steps with the demo's model, optimizer, data order and
seed: eps prediction with min-SNR weighting (configs/digits.py, the demo), and rectified flow
(configs/digits_flow.py) with logit-normal and with uniform times. Each is scored (conditional
accuracy and digits FD on 1000 samples, guidance 4) at 4, 8, 16 and 32 model evaluations (NFE)
with each of its samplers: Euler, Heun and DPM-Solver++(2M) for flow, DDIM and DPM-Solver++(2M)
for eps. Heun with n grid points makes 2n - 1 evaluations, so it runs at n = NFE / 2 (one
evaluation fewer than the others). Writes <out>.json, <out>.md and <out>.png; rerunning resumes.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import plots, sweep

NFES = (4, 8, 16, 32)
COMMON = {
  "total_steps": 2000,
  "log_every": 100,
  "ckpt_every": 2000,
  "sample_every": 0,
  "progress_bar": False,
  "sample.num": 0,
  "sample.cfg_scale": 4.0,
  "eval.num_samples": 1000,
  "eval.batch_size": 500,
}
# name -> (base config, training overrides, samplers).
MODELS = {
  "eps (min-SNR)": ("configs/digits.py", {}, ("ddim", "dpmpp_2m")),
  "flow, logit-normal t": ("configs/digits_flow.py", {}, ("euler", "heun", "dpmpp_2m")),
  "flow, uniform t": (
    "configs/digits_flow.py",
    {"flow.time_sampler": "uniform"},
    ("euler", "heun", "dpmpp_2m"),
  ),
}


def steps_for(sampler: str, nfe: int) -> int:
  """Grid points giving at most `nfe` model evaluations."""
  return nfe // 2 if sampler in ("heun", "midpoint") else nfe


def nfe_of(sampler: str, steps: int) -> int:
  return {"heun": 2 * steps - 1, "midpoint": 2 * steps}.get(sampler, steps)


def run(root: str, out: str, nfes=NFES) -> list[dict]:
  records = []
  for name, (base_spec, train, samplers) in MODELS.items():
    base = sweep.apply_overrides(sweep.load_base(base_spec), COMMON)
    sub = os.path.join(root, "flow" if "flow" in base else "eps")
    for sampler in samplers:
      for nfe in nfes:
        steps = steps_for(sampler, nfe)
        arm = dict(train, **{"sample.sampler": sampler, "sample.steps": steps})
        r = sweep.run_arm(base, arm, sub)
        r.update(model=name, sampler=sampler, nfe=nfe_of(sampler, steps))
        records.append(r)
        print(
          f"{name} / {sampler} / NFE {r['nfe']}: acc {r['accuracy']:.3f} FD {r['digits_fd']:.2f}",
          flush=True,
        )
        write(records, out)
  return records


def write(records: list[dict], out: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump({"common": COMMON, "records": records}, f, indent=2)
  lines = ["| model | sampler | NFE | cond. accuracy | digits FD |", "|---|---|---|---|---|"]
  for r in records:
    lines.append(
      f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['accuracy']:.3f} | {r['digits_fd']:.2f} |"
    )
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(records, out + ".png")


def plot(records: list[dict], path: str) -> None:
  """Digits FD and accuracy against NFE, one curve per (model, sampler)."""
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))

  def fmt(r):  # One line style per model: logit-normal flow solid, eps dashed, uniform dotted.
    if r["model"].startswith("flow, logit"):
      return "o-"
    return "o--" if r["model"].startswith("eps") else "o:"

  label = lambda r: f"{r['model']}: {r['sampler']}"
  plots.lines(axes[0], records, "nfe", "digits_fd", by=label, fmt=fmt)
  plots.lines(axes[1], records, "nfe", "accuracy", by=label, fmt=fmt)
  axes[0].set(xlabel="model evaluations (NFE)", ylabel="digits FD ↓", xscale="log", yscale="log")
  axes[1].set(xlabel="model evaluations (NFE)", ylabel="cond. accuracy ↑", xscale="log")
  axes[1].axhline(0.98, color="grey", lw=0.5)
  axes[0].legend(fontsize=7)
  plots.save(fig, path)


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/flow_vs_eps", "Root of the per-model workdirs.")
  flags.DEFINE_string("out", "docs/flow_matching/digits", "Output prefix (.json, .md, .png).")


def main(argv):
  del argv
  run(FLAGS.workdir, FLAGS.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
