"""Learning-rate transfer across widths, standard parametrization against muP (digits).

  python -m experiments.lr_transfer --workdir=runs/lr_transfer --out=docs/mup/lr_transfer

The sweep (experiments/sweep.py, resumable): configs/digits.py at widths 64, 128 and 256 (the
heads grow with the width, so the head dimension stays 32), 9 learning rates a factor 2 apart,
under parametrization "sp" and "mup" (base width 128, the digits default), 400 steps each.
The same sweep from the generic command:

  python -m experiments.sweep --config=configs/digits.py --workdir=runs/lr_transfer \
      --grid=parametrization=sp,mup --grid=model.hidden_size:model.num_heads=64:2,128:4,256:8 \
      --grid=optim.lr=2.5e-4,5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2,6.4e-2 --x=optim.lr --evaluate \
      --config.total_steps=400 --config.log_every=10 --config.sample_every=0 \
      --config.progress_bar=false --config.ckpt_every=400 --config.eval.num_samples=200 \
      --config.eval.batch_size=200 --config.sample.steps=20

Each run is scored by its eps-MSE (the DDPM loss of the EMA model on 512 training images at
fixed t and noise: deterministic, so the curves are not training-batch noise) and by its
final training loss. Per parametrization and width the optimum is the grid point with the
lowest score, refined by a parabola through it and its two neighbours in log2(lr); the shift
is log2(optimum at the widest / optimum at the narrowest), in factors of 2 (0 = transfers),
also per doubling of the width.
Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from experiments import plots, sweep

WIDTHS = ((64, 2), (128, 4), (256, 8))  # (hidden_size, num_heads): head dimension 32.
LRS = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)
PARAMETRIZATIONS = ("sp", "mup")
COMMON = {
  "total_steps": 400,
  "log_every": 10,
  "sample_every": 0,
  "progress_bar": False,
  "ckpt_every": 400,
  "eval.num_samples": 200,
  "eval.batch_size": 200,
  "sample.steps": 20,
}
SCORES = ("eps_mse", "final_loss")


def arms() -> list[dict]:
  """The sweep's overrides, in the generic command's order (parametrization slowest)."""
  grid = {
    "parametrization": list(PARAMETRIZATIONS),
    "model.hidden_size:model.num_heads": list(WIDTHS),
    "optim.lr": list(LRS),
  }
  return sweep.grid_arms(grid)


def optimum(lrs, scores) -> dict:
  """The grid argmin of `scores` over `lrs`, and the vertex of the parabola in log2(lr)
  through it and its neighbours (the grid point itself at an edge or without a minimum)."""
  order = np.argsort(lrs)
  x, y = np.log2(np.asarray(lrs, float)[order]), np.asarray(scores, float)[order]
  i = int(np.argmin(y))
  best = {"lr_grid": float(2 ** x[i]), "score": float(y[i]), "edge": i in (0, len(x) - 1)}
  refined = x[i]
  if not best["edge"]:
    a, b, _ = np.polyfit(x[i - 1 : i + 2], y[i - 1 : i + 2], 2)
    if a > 0:
      refined = float(np.clip(-b / (2 * a), x[i - 1], x[i + 1]))
  best["lr"] = float(2**refined)
  return best


def analyse(records: list[dict]) -> dict:
  """{score: {parametrization: {"optima": {width: optimum}, "shift_log2": float}}}."""
  out = {}
  for score in SCORES:
    out[score] = {}
    for p in PARAMETRIZATIONS:
      optima = {}
      for width, _ in WIDTHS:
        runs = [
          r
          for r in records
          if r["overrides"]["parametrization"] == p
          and r["overrides"]["model.hidden_size"] == width
          and r["status"] == "finished"
          and r.get(score) is not None
        ]
        if len(runs) >= 3:
          lrs = [r["overrides"]["optim.lr"] for r in runs]
          optima[str(width)] = optimum(lrs, [r[score] for r in runs])
      entry = {"optima": optima}
      if len(optima) >= 2:
        widths = sorted(optima, key=int)
        shift = lambda a, b, o=optima: float(np.log2(o[b]["lr"] / o[a]["lr"]))
        entry["shift_log2"] = shift(widths[0], widths[-1])
        pairs = zip(widths, widths[1:], strict=False)
        entry["steps_log2"] = {f"{a}->{b}": shift(a, b) for a, b in pairs}
      out[score][p] = entry
  return out


def run(root: str, out: str, train: bool = True) -> dict:
  base = sweep.apply_overrides(sweep.load_base("configs/digits.py"), COMMON)
  records = sweep.run_sweep(base, arms(), root, evaluate=True, train=train)
  results = {"common": COMMON, "records": records, "analysis": analyse(records)}
  write(results, out)
  return results


def write(results: dict, out: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  sweep.write_json(out + ".json", results)
  pairs = [f"{a}->{b}" for (a, _), (b, _) in zip(WIDTHS, WIDTHS[1:], strict=False)]
  lines = [
    "| parametrization | score | optimum lr at width "
    + " | ".join(str(w) for w, _ in WIDTHS)
    + " | "
    + " | ".join(f"shift {pair}" for pair in pairs)
    + " | shift, widest / narrowest |",
    "|---|---|" + "---|" * (len(WIDTHS) + len(pairs)) + "---|",
  ]
  for score in SCORES:
    for p in PARAMETRIZATIONS:
      entry = results["analysis"][score][p]
      cells = [p, score]
      for w, _ in WIDTHS:
        o = entry["optima"].get(str(w))
        cells.append("-" if o is None else f"{o['lr']:.2e}" + (" (edge)" if o["edge"] else ""))
      for pair in pairs:
        step = entry.get("steps_log2", {}).get(pair)
        cells.append("-" if step is None else f"{step:+.2f}")
      shift = entry.get("shift_log2")
      cells.append("-" if shift is None else f"{shift:+.2f}")
      lines.append("| " + " | ".join(cells) + " |")
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(results, out + ".png")


def plot(results: dict, path: str) -> None:
  """eps-MSE against the learning rate, one panel per parametrization, one line per width,
  a star at each width's best grid point."""
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  finished = [r for r in results["records"] if r["status"] == "finished" and r.get("eps_mse")]
  for ax, p in zip(axes, PARAMETRIZATIONS, strict=True):
    runs = [r for r in finished if r["overrides"]["parametrization"] == p]
    width = lambda r: f"width {r['overrides']['model.hidden_size']}"
    plots.lines(ax, runs, lambda r: r["overrides"]["optim.lr"], "eps_mse", by=width)
    for o in results["analysis"]["eps_mse"][p]["optima"].values():
      ax.plot([o["lr_grid"]], [o["score"]], "*", color="k", ms=9, zorder=3)
    shift = results["analysis"]["eps_mse"][p].get("shift_log2")
    title = {"sp": "SP", "mup": "muP (base width 128)"}[p]
    if shift is not None:
      title += f": optimum moves {shift:+.2f} octaves, 64 -> 256"
    ax.set(xscale="log", yscale="log", xlabel="learning rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("eps-MSE (EMA model) ↓")
  plots.save(fig, path)


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/lr_transfer", "Root of the per-run workdirs.")
  flags.DEFINE_string("out", "docs/mup/lr_transfer", "Output prefix (.json, .md, .png).")
  flags.DEFINE_bool("plot_only", False, "Train nothing: analyse and plot what the runs hold.")


def main(argv):
  del argv
  run(FLAGS.workdir, FLAGS.out, train=not FLAGS.plot_only)


if __name__ == "__main__":
  define_flags()
  app.run(main)
