"""Scaling sweeps: model size x patch size at a fixed data budget, loss against training compute.

  # CPU, digits, sizes scaled down 6x (S -> 64 wide, 2 deep, ...):
  python -m experiments.scaling --workdir=runs/scaling --out=docs/scaling
  # Accelerators, the paper's presets on ImageNet latents, unchanged code:
  python -m experiments.scaling --base=configs/imagenet256_dit.py --scale=1 \
      --sizes=S,B,L,XL --patches=8,4,2 --total_steps=400000 --workdir=runs/scaling \
      --set=data.path=/data/imagenet256_latents

A sweep spec is a list of config overrides, one per run (`sweep_spec`). Every run trains
with the same batch size and number of steps (the same images seen), so its training
compute is gflops_train per image (dit.info, counted from the jaxpr) x batch x steps. Each
run's metrics.jsonl gives the loss curve against cumulative compute (as DiT's Figures 8-9,
one curve per model); the final loss (and the eval metric, when the base config has an
eval section) against total compute is fitted with a power law L = a * C^b. Results are read
back from the run directories, so a sweep stopped half way can be re-plotted (--plot_only)
or resumed by running the same command.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
from absl import flags, logging

from dit import cli
from experiments import sweep

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("S", "B", "L", "XL")

# Fixed budget of the CPU sweep on digits (16x16x1): the same images seen by every run.
DIGITS_SCALING = {
  "data.resolution": 16,
  "model.input_size": 16,
  "batch_size": 64,
  "total_steps": 300,
  "optim.warmup_steps": 50,
  "log_every": 25,
  "ckpt_every": 300,
  "sample_every": 0,
  "progress_bar": False,
  "sample.num": 0,
  "sample.steps": 25,
  "eval.num_samples": 200,
  "eval.batch_size": 200,
}


def paper_presets() -> dict[str, tuple[int, int, int]]:
  """DiT's sizes, (hidden, depth, heads) per name, from configs/imagenet256_dit.py."""
  return dict(_paper_presets())


@functools.cache
def _paper_presets() -> dict[str, tuple[int, int, int]]:
  return cli.load_config_module(str(ROOT / "configs" / "imagenet256_dit.py")).MODEL_PRESETS


def scaled_preset(size: str, scale: float) -> tuple[int, int, int]:
  """(hidden, depth, heads) of DiT-`size` with width and depth divided by `scale`.

  scale=1 is the paper's preset. Otherwise the width is rounded to a multiple of 32, the
  depth to an integer >= 1, and the heads are scaled with the width (so the head size stays
  that of the paper) and then lowered until they divide the width.
  """
  presets = paper_presets()
  if size not in presets:
    raise ValueError(f"Unknown model size {size!r}; expected one of {tuple(presets)}")
  if scale <= 0:
    raise ValueError(f"scale must be positive, got {scale}")
  hidden, depth, heads = presets[size]
  if scale == 1:
    return hidden, depth, heads
  new_hidden = max(32, 32 * round(hidden / scale / 32))
  new_depth = max(1, round(depth / scale))
  new_heads = max(1, round(heads * new_hidden / hidden))
  while new_hidden % new_heads:
    new_heads -= 1
  return new_hidden, new_depth, new_heads


def sweep_spec(sizes, patches, scale: float) -> list[dict]:
  """One override dict per (size, patch): the model's width, depth, heads and patch size."""
  spec = []
  for size in sizes:
    hidden, depth, heads = scaled_preset(size, scale)
    for patch in patches:
      spec.append(
        {
          "model.hidden_size": hidden,
          "model.depth": depth,
          "model.num_heads": heads,
          "model.patch_size": int(patch),
        }
      )
  return spec


def run_label(overrides: dict, scale: float) -> str:
  """ "S/4"-style name of a run (the preset it was scaled from), else "hidden x depth / p"."""
  key = (overrides["model.hidden_size"], overrides["model.depth"], overrides["model.num_heads"])
  for size in paper_presets():
    if scaled_preset(size, scale) == key:
      return f"{size}/{overrides['model.patch_size']}"
  return f"{key[0]}x{key[1]}/{overrides['model.patch_size']}"


def train_gflops(config) -> dict:
  """dit.info's counts for one image of this config's model."""
  from dit.info import model_info
  from dit.models import dit as dit_model

  return model_info(dit_model.build_model(config.model))


def power_law_fit(compute, values) -> dict | None:
  """Least squares of log(value) = log(a) + b log(compute): {"a", "b", "r2"}."""
  c, v = np.asarray(compute, float), np.asarray(values, float)
  ok = np.isfinite(c) & np.isfinite(v) & (c > 0) & (v > 0)
  if ok.sum() < 2 or np.ptp(np.log(c[ok])) == 0:
    return None
  x, y = np.log(c[ok]), np.log(v[ok])
  b, log_a = np.polyfit(x, y, 1)
  resid = y - (log_a + b * x)
  total = np.sum((y - y.mean()) ** 2)
  r2 = 1.0 - np.sum(resid**2) / total if total > 0 else 1.0
  return {"a": float(np.exp(log_a)), "b": float(b), "r2": float(r2)}


def run_sweep(
  spec: list[dict],
  root: str,
  out: str,
  *,
  base_spec: str = "configs/digits.py",
  common: dict | None = None,
  scale: float = 6,
  train: bool = True,
) -> dict:
  """Trains (or resumes) every run of `spec`, then writes <out>.json and <out>.png.

  train=False only collects what the run directories hold (re-plot a partial sweep).
  """
  base = sweep.apply_overrides(cli.load_config(base_spec), common or {})
  evaluate = "eval" in base
  runs = []
  for overrides in spec:
    config = sweep.apply_overrides(base, overrides)
    workdir = os.path.join(root, sweep.slug(sweep.train_overrides(base, overrides)))
    if train:
      sweep.run_arm(base, overrides, root, evaluate=evaluate)
    rows = sweep.read_metrics(workdir)
    if not rows:
      logging.warning("No metrics in %s yet; skipped.", workdir)
      continue
    info = train_gflops(config)
    per_step = info["gflops_train"] * config.batch_size
    record = {
      "label": run_label(overrides, scale),
      "overrides": overrides,
      "workdir": workdir,
      "params": info["params"],
      "tokens": info["tokens"],
      "gflops_fwd": info["gflops_fwd"],
      "gflops_train_per_image": info["gflops_train"],
      "steps": rows[-1]["step"],
      "finished": rows[-1]["step"] >= config.total_steps,
      "train_gflops": per_step * rows[-1]["step"],
      "final_loss": sweep.final_loss(rows),
      "curve": [[r["step"] * per_step, r["loss"]] for r in rows],
    }
    eval_path = os.path.join(workdir, sweep.eval_name(config)) if evaluate else ""
    if eval_path and os.path.exists(eval_path):
      with open(eval_path) as f:
        record["eval"] = json.load(f)
    runs.append(record)

  results = {"base": base_spec, "common": common or {}, "scale": scale, "runs": runs}
  finished = [r for r in runs if r["finished"]]
  results["fit_loss"] = power_law_fit(
    [r["train_gflops"] for r in finished], [r["final_loss"] for r in finished]
  )
  metric = "digits_fd" if base.get("eval", {}).get("metric") == "digits" else "fid"
  with_eval = [r for r in finished if metric in r.get("eval", {})]
  results["eval_metric"] = metric
  results["fit_eval"] = power_law_fit(
    [r["train_gflops"] for r in with_eval], [r["eval"][metric] for r in with_eval]
  )
  write_results(results, out)
  return results


def write_results(results: dict, out: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(results, f, indent=2)

  runs = results["runs"]
  metric = results["eval_metric"]
  with_eval = any(metric in r.get("eval", {}) for r in runs)
  fig, axes = plt.subplots(1, 2 if with_eval else 1, figsize=(11 if with_eval else 6, 4))
  axes = np.atleast_1d(axes)
  for i, r in enumerate(runs):
    curve = np.asarray(r["curve"])
    axes[0].plot(curve[:, 0], curve[:, 1], color=f"C{i}", alpha=0.8, label=r["label"])
    axes[0].plot([r["train_gflops"]], [r["final_loss"]], "o", color=f"C{i}")
  _plot_fit(axes[0], results["fit_loss"], runs)
  axes[0].set(xscale="log", yscale="log", xlabel="training compute (GFLOPs)", ylabel="loss")
  axes[0].legend(fontsize=8)
  if with_eval:
    for i, r in enumerate(runs):
      if metric in r.get("eval", {}):
        axes[1].plot([r["train_gflops"]], [r["eval"][metric]], "o", color=f"C{i}", label=r["label"])
    _plot_fit(axes[1], results["fit_eval"], runs)
    axes[1].set(xscale="log", yscale="log", xlabel="training compute (GFLOPs)", ylabel=metric)
    axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out + ".png", dpi=100)
  plt.close(fig)


def _plot_fit(ax, fit: dict | None, runs: list[dict]) -> None:
  if not fit:
    return
  c = np.geomspace(min(r["train_gflops"] for r in runs), max(r["train_gflops"] for r in runs))
  label = f"{fit['a']:.3g} C^{fit['b']:.3f} (R²={fit['r2']:.2f})"
  ax.plot(c, fit["a"] * c ** fit["b"], "k--", lw=1, label=label)


# ---- Command line ------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags, defined only when run as a command (the module imports cleanly)."""
  flags.DEFINE_string("base", "configs/digits.py", "Base config (path.py[:arg]).")
  flags.DEFINE_float("scale", None, "Divide preset width/depth by this (default: 6 on digits).")
  flags.DEFINE_list("sizes", ["S", "B"], "Model sizes (S, B, L, XL).")
  flags.DEFINE_list("patches", ["4", "2"], "Patch sizes.")
  flags.DEFINE_integer("total_steps", None, "Train steps of every run (the data budget).")
  flags.DEFINE_list("set", [], "More overrides key=value (Python literals), e.g. data.path=/x.")
  flags.DEFINE_string("workdir", "runs/scaling", "Root of the per-run workdirs.")
  flags.DEFINE_string("out", "runs/scaling/scaling", "Output prefix (.json, .png).")
  flags.DEFINE_bool("plot_only", False, "Only collect and plot what the run dirs hold.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  digits = FLAGS.base.startswith(("configs/digits.py", str(ROOT / "configs/digits.py")))
  common = dict(DIGITS_SCALING) if digits else {}
  scale = FLAGS.scale or (6.0 if digits else 1.0)
  if FLAGS.total_steps:
    common.update(total_steps=FLAGS.total_steps, ckpt_every=FLAGS.total_steps)
  # Typed by the base config (and the DiT defaults): a bad key or value stops here, in one line.
  common.update(
    cli.parse_overrides(cli.load_config(FLAGS.base), FLAGS.set, defaults=sweep.MODEL_DEFAULTS)
  )
  spec = sweep_spec(FLAGS.sizes, [int(p) for p in FLAGS.patches], scale)
  results = run_sweep(
    spec,
    FLAGS.workdir,
    FLAGS.out,
    base_spec=FLAGS.base,
    common=common,
    scale=scale,
    train=not FLAGS.plot_only,
  )
  print(json.dumps({k: results[k] for k in ("fit_loss", "fit_eval")}))


if __name__ == "__main__":
  define_flags()
  cli.run_command(main)
