"""Ablations on the digits data: conditioning, loss weighting, prediction type, sampler x NFE.

  python -m experiments.ablations --workdir=runs/ablations --out=docs/ablations/digits
      [--ablations=conditioning,prediction] [--total_steps=800] [--num_samples=400]

Every ablation is a list of config overrides (ABLATIONS below) applied to configs/digits.py
plus the common settings of DIGITS_ABLATION (the demo's recipe: 8x8 digits, patch 2 -> 16
tokens, min-SNR weighting, lr 2e-3; 800 instead of 2000 steps, so that the arms are not all
at 100% accuracy). Each arm
trains for the same number of steps with the same seed and data order, then is scored with
dit.evaluate.evaluate (conditional accuracy and digits_fd, a Frechet distance in a digits
classifier's feature space), the last logged training loss, and eps_mse (the noise-prediction
MSE on fixed (x0, t, noise), comparable across prediction types and weightings). Arms that
only change sample.* share their trained model. Writes <out>.json, <out>.md and one PNG per
ablation (<out>_<name>.png). Rerunning the command resumes a partial sweep.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import plots, sweep

# The common settings: the demo's model and recipe at 800 steps. They are pinned (not taken
# from configs/digits.py's defaults) so the committed table stays valid.
DIGITS_ABLATION = {
  "optim.lr": 2e-3,
  "optim.schedule": "cosine",
  "diffusion.weighting": "min_snr",
  "diffusion.prediction": "eps",
  "data.resolution": 8,
  "model.input_size": 8,
  "model.patch_size": 2,
  "model.hidden_size": 128,
  "model.depth": 4,
  "model.num_heads": 4,
  "batch_size": 64,
  "total_steps": 800,
  "optim.warmup_steps": 100,
  "log_every": 50,
  "ckpt_every": 800,
  "sample_every": 0,
  "progress_bar": False,
  "sample.num": 0,
  "sample.sampler": "ddim",
  "sample.steps": 50,
  "sample.cfg_scale": 4.0,
  "eval.num_samples": 400,
  "eval.batch_size": 200,
}

# name -> (arms, the override that labels an arm in tables and plots).
ABLATIONS = {
  # DiT Figure 5: how the timestep and class enter the blocks.
  "conditioning": [{"model.block": b} for b in ("adaln_zero", "adaln", "cross_attn", "in_context")],
  "loss_weighting": [{"diffusion.weighting": w} for w in ("uniform", "min_snr")],
  "prediction": [{"diffusion.prediction": p} for p in ("eps", "v")],
  # The original DiT block against LightningDiT's choices (configs/digits.py:lightningdit),
  # one option at a time and together, at equal steps and about equal params (+0.1%); the
  # two ends with a second seed.
  "backbone": [
    {"model.norm": "layernorm", "model.mlp": "gelu", "model.pos_embed": "sincos"},
    {"model.norm": "rmsnorm"},
    {"model.mlp": "swiglu"},
    {"model.pos_embed": "rope"},
    {"model.pos_embed": "both"},
    {"model.norm": "rmsnorm", "model.mlp": "swiglu", "model.pos_embed": "both"},
    {"model.norm": "layernorm", "model.mlp": "gelu", "model.pos_embed": "sincos", "seed": 1},
    {"model.norm": "rmsnorm", "model.mlp": "swiglu", "model.pos_embed": "both", "seed": 1},
  ],
  # One trained model (the base), sampled with each sampler at each number of model calls
  # (200 samples each: the differences between samplers at low NFE are large).
  "sampler_nfe": [
    {"sample.sampler": s, "sample.steps": n, "eval.num_samples": 200}
    for s in ("ddim", "dpmpp_2m", "euler")
    for n in (5, 10, 25, 50)
    if s == "ddim" or n < 50
  ],
}


def arm_label(arm: dict) -> str:
  return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in arm.items()) or "base"


def run_ablations(
  names: list[str],
  root: str,
  out: str,
  *,
  base_spec: str = "configs/digits.py",
  common: dict | None = None,
  ablations: dict | None = None,
) -> dict:
  """Runs (or resumes) the named ablations; writes <out>.json, <out>.md, <out>_<name>.png."""
  ablations = ABLATIONS if ablations is None else ablations
  unknown = [n for n in names if n not in ablations]
  if unknown:
    raise ValueError(f"Unknown ablations {unknown}; expected some of {sorted(ablations)}")
  common = DIGITS_ABLATION if common is None else common
  base = sweep.apply_overrides(sweep.load_base(base_spec), common)
  results = {"base": base_spec, "common": dict(common), "ablations": {}}
  for name in names:
    records = []
    for arm in ablations[name]:
      record = sweep.run_arm(base, arm, root)
      record["arm"] = arm_label(arm)
      records.append(record)
      print(f"[{name}] {record['arm']}: " + _summary(record), flush=True)
      # Write as we go, so a long sweep can be looked at (and re-plotted) half way.
      results["ablations"][name] = records
      write_results(results, out)
  return results


def _summary(record: dict) -> str:
  keys = ("final_loss", "eps_mse", "accuracy", "digits_fd", "fid")
  return ", ".join(f"{k}={record[k]:.4g}" for k in keys if record.get(k) is not None)


COLUMNS = (
  ("arm", "arm", "{}"),
  ("steps", "train steps", "{}"),
  ("final_loss", "final train loss", "{:.4f}"),
  ("eps_mse", "eps-MSE", "{:.4f}"),
  ("accuracy", "cond. accuracy", "{:.3f}"),
  ("digits_fd", "digits FD", "{:.2f}"),
)


def markdown_table(records: list[dict]) -> str:
  cols = [c for c in COLUMNS if any(c[0] in r for r in records)]
  lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
  for r in records:
    cells = [fmt.format(r[k]) if r.get(k) is not None else "" for k, _, fmt in cols]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_results(results: dict, out: str) -> None:
  """<out>.json (everything), <out>.md (one table per ablation), <out>_<name>.png."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(results, f, indent=2)
  parts = [f"Base: `{results['base']}` with `{json.dumps(results['common'])}`.\n"]
  for name, records in results["ablations"].items():
    parts.append(f"### {name}\n\n{markdown_table(records)}\n")
  with open(out + ".md", "w") as f:
    f.write("\n".join(parts))
  for name, records in results["ablations"].items():
    if name == "sampler_nfe":
      plot_sampler_nfe(records, f"{out}_{name}.png")
    else:
      plot_arms(name, records, f"{out}_{name}.png")


def plot_arms(name: str, records: list[dict], path: str) -> None:
  """Training-loss curves (left) and the eval metrics as bars (right) for one ablation."""
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for r in records:
    rows = sweep.read_metrics(r["workdir"])
    axes[0].plot([x["step"] for x in rows], [x["loss"] for x in rows], label=r["arm"])
  axes[0].set(xlabel="train step", ylabel="train loss (own target)", yscale="log", title=name)
  axes[0].legend(fontsize=8)
  labels = [r["arm"].split("=")[-1] for r in records]
  for ax, key, title in ((axes[1], "accuracy", "cond. accuracy ↑"), (axes[2], "digits_fd", "FD ↓")):
    ax.bar(labels, [r.get(key, float("nan")) for r in records], color="C0")
    ax.set(title=title)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
  plots.save(fig, path)


def plot_sampler_nfe(records: list[dict], path: str) -> None:
  """Digits FD and accuracy against sampling steps, one curve per sampler."""
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  steps = lambda r: r["overrides"]["sample.steps"]
  sampler = lambda r: r["overrides"]["sample.sampler"]
  plots.lines(axes[0], records, steps, "digits_fd", by=sampler)
  plots.lines(axes[1], records, steps, "accuracy", by=sampler)
  axes[0].set(xlabel="sampling steps", ylabel="digits FD ↓", xscale="log", yscale="log")
  axes[1].set(xlabel="sampling steps", ylabel="cond. accuracy ↑", xscale="log")
  axes[0].legend(fontsize=8)
  plots.save(fig, path)


# ---- Command line ------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags, defined only when run as a command (the module imports cleanly)."""
  flags.DEFINE_list(
    "ablations", ["conditioning", "sampler_nfe", "prediction", "loss_weighting"], "Which to run."
  )
  flags.DEFINE_string("workdir", "runs/ablations", "Root of the per-arm workdirs.")
  flags.DEFINE_string("out", "docs/ablations/digits", "Output prefix (.json, .md, _<name>.png).")
  flags.DEFINE_string("base", "configs/digits.py", "Base config (path.py[:arg]).")
  flags.DEFINE_integer("total_steps", None, "Train steps per arm (default: DIGITS_ABLATION).")
  flags.DEFINE_integer("num_samples", None, "Samples per evaluation (default: DIGITS_ABLATION).")


def main(argv):
  del argv
  common = dict(DIGITS_ABLATION)
  if FLAGS.total_steps:
    common.update(total_steps=FLAGS.total_steps, ckpt_every=FLAGS.total_steps)
  if FLAGS.num_samples:
    common["eval.num_samples"] = FLAGS.num_samples
  run_ablations(FLAGS.ablations, FLAGS.workdir, FLAGS.out, base_spec=FLAGS.base, common=common)


if __name__ == "__main__":
  define_flags()
  app.run(main)
