r"""Scaling studies: model size x patch size x training compute, loss against compute.

  # CPU, digits, sizes scaled down 6x (S -> 64 wide, 2 deep, ...), every run 300 steps:
  python -m experiments.scaling --workdir=runs/scaling --out=docs/scaling/digits
  # isoFLOP: each run trains for a compute budget (GFLOPs), its steps set by its model's cost:
  python -m experiments.scaling --sizes=S,B,L,XL --patches=4 --budgets=500,1000,2000 \
      --workdir=runs/scaling --out=docs/scaling/digits
  # Accelerators, the paper's presets on ImageNet latents, the same code:
  python -m experiments.scaling --base=configs/imagenet256_dit.py --scale=1 \
      --sizes=S,B,L,XL --patches=2 --budgets=1e9,3e9,1e10 --workdir=runs/scaling \
      --set=data.path=/data/imagenet256_latents

The runs are a sweep (experiments/sweep.py): one workdir per run, resumable, and a rerun of
the same command trains only the missing runs; --plot_only re-fits and re-plots from the run
directories. Every run has the same batch size, so its training compute is gflops_train per
image (dit.models.flops, counted from the jaxpr) x batch x steps. Without --budgets every run
trains the same steps (the same images seen) and each run is one point of the fit. With
--budgets each (model, budget) run trains budget / (gflops_train x batch) steps, and:
  isoFLOP curves    loss against parameters at each budget, a parabola in ln(params) whose
                    vertex is the compute-optimal size (when it lies inside the sizes tried)
  fit_loss          best loss at each budget = a * C^b, with a confidence interval on b
  fit_eval          the same for the evaluation metric (digits FD or FID), when evaluated
  optimal_size      compute-optimal parameters = a * C^b (Chinchilla's approach 2)
Writes <out>.json (every run and fit) and <out>.png, which is plotted from that JSON.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from absl import flags

from dit import cli
from dit.cli import UserError
from experiments import plots, sweep

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("S", "B", "L", "XL")
CONFIDENCE = 0.95  # Of the fits' intervals.

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
# Keys of a sweep record that are not evaluation scores.
RUN_KEYS = ("overrides", "workdir", "status", "steps", "final_loss", "steps_per_sec")


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


def train_gflops(config: ml_collections.ConfigDict) -> dict:
  """dit.models.flops.model_info of one image of this config's model (cached per model)."""
  return dict(_model_info(config.model.to_json_best_effort(sort_keys=True)))


@functools.cache
def _model_info(model_json: str) -> dict:
  from dit.models import dit as dit_model
  from dit.models import flops

  return flops.model_info(dit_model.build_model(json.loads(model_json)))


def budget_overrides(base: ml_collections.ConfigDict, model: dict, budget: float) -> dict:
  """{"total_steps", "optim.warmup_steps"} that spend `budget` GFLOPs training `model`.

  steps = round(budget / (gflops_train per image x batch)); the warmup is at most a fifth of
  them. UserError if the budget is less than one step.
  """
  config = sweep.apply_overrides(base, model)
  per_step = train_gflops(config)["gflops_train"] * config.batch_size
  steps = round(budget / per_step)
  if steps < 1:
    raise UserError(
      f"Budget {budget:g} GFLOPs is less than one step of {model} ({per_step:.4g} GFLOPs)."
    )
  return {"total_steps": steps, "optim.warmup_steps": min(config.optim.warmup_steps, steps // 5)}


# ---- Fits --------------------------------------------------------------------------------


def power_law_fit(x, y, level: float = CONFIDENCE) -> dict | None:
  """Least squares of ln(y) = ln(a) + b ln(x) over the finite positive points.

  Returns None with fewer than 2 points (or one x), else {"a", "b", "r2", "n", "level",
  "b_ci": [lo, hi], "a_ci": [lo, hi], "cov": 2x2 covariance of (ln a, b), "t": the Student-t
  quantile of `level`}: t-intervals from the fit's covariance, exact for log-normal noise
  (the intervals, cov and t are None with 2 points: no residual degree of freedom).
  """
  from scipy import stats

  x, y = np.asarray(x, float), np.asarray(y, float)
  ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
  if ok.sum() < 2 or np.ptp(np.log(x[ok])) == 0:
    return None
  lx, ly = np.log(x[ok]), np.log(y[ok])
  n = len(lx)
  design = np.stack([np.ones(n), lx], axis=-1)
  (log_a, b), *_ = np.linalg.lstsq(design, ly)
  resid = ly - design @ np.array([log_a, b])
  total = np.sum((ly - ly.mean()) ** 2)
  fit = {
    "a": float(np.exp(log_a)),
    "b": float(b),
    "r2": float(1.0 - np.sum(resid**2) / total) if total > 0 else 1.0,
    "n": n,
    "level": level,
    "b_ci": None,
    "a_ci": None,
    "cov": None,
    "t": None,
  }
  if n > 2:
    cov = np.sum(resid**2) / (n - 2) * np.linalg.inv(design.T @ design)
    t = float(stats.t.ppf(0.5 + level / 2, n - 2))
    se_log_a, se_b = np.sqrt(np.diag(cov))
    fit.update(
      b_ci=[float(b - t * se_b), float(b + t * se_b)],
      a_ci=[float(np.exp(log_a - t * se_log_a)), float(np.exp(log_a + t * se_log_a))],
      cov=cov.tolist(),
      t=t,
    )
  return fit


def _value(run: dict, value: str) -> float | None:
  """run[value], or run["eval"][value] for an evaluation metric."""
  v = run.get(value) if value in run else run.get("eval", {}).get(value)
  return None if v is None else float(v)


def _finished(runs: Sequence[dict], value: str) -> list[dict]:
  return [r for r in runs if r["status"] == "finished" and _value(r, value) is not None]


def isoflop_curves(runs: Sequence[dict], value: str = "final_loss") -> list[dict]:
  """Per (family, budget): `value` against params of the finished runs at that budget.

  Each curve: {"family", "budget_gflops", "labels", "params", "values", "parabola": [c2, c1,
  c0] of value = c2 ln(N)^2 + c1 ln(N) + c0 (3 or more sizes) or None, "opt_params",
  "opt_value", "interior"}: when the best run has a worse one on each side and the parabola
  opens upwards with its vertex inside the sizes tried, the optimum is the vertex
  (interior=True); else it is the best run (False).
  """
  groups: dict[tuple, list[dict]] = {}
  for r in _finished(runs, value):
    if r.get("budget_gflops") is not None:
      groups.setdefault((r["family"], r["budget_gflops"]), []).append(r)
  curves = []
  for (family, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    rs = sorted(rs, key=lambda r: r["params"])
    n, v = np.array([r["params"] for r in rs], float), np.array([_value(r, value) for r in rs])
    best = int(np.argmin(v))
    curve = {
      "family": family,
      "budget_gflops": budget,
      "labels": [r["label"] for r in rs],
      "params": n.tolist(),
      "values": v.tolist(),
      "parabola": None,
      "opt_params": float(n[best]),
      "opt_value": float(v[best]),
      "interior": False,
    }
    if len(np.unique(n)) >= 3:
      c2, c1, c0 = np.polyfit(np.log(n), v, 2)
      curve["parabola"] = [float(c2), float(c1), float(c0)]
      vertex = -c1 / (2 * c2) if c2 > 0 else np.nan
      # A vertex inside the sizes is not enough: a steep one-sided curve (the smallest model
      # best, losses rising fast) puts it inside too. The best run must have a worse one on
      # each side.
      if 0 < best < len(n) - 1 and np.log(n[0]) <= vertex <= np.log(n[-1]):
        curve.update(
          opt_params=float(np.exp(vertex)),
          opt_value=float(np.polyval([c2, c1, c0], vertex)),
          interior=True,
        )
    curves.append(curve)
  return curves


def frontier(runs: Sequence[dict], value: str) -> list[list[float]]:
  """[[compute, best value]] sorted by compute: with budgets, the lowest `value` of the
  finished runs at each budget; without, every finished run at its own compute."""
  done = _finished(runs, value)
  if not any(r.get("budget_gflops") is not None for r in done):
    return sorted([float(r["train_gflops"]), _value(r, value)] for r in done)
  best: dict[float, float] = {}
  for r in done:
    c = float(r["budget_gflops"])
    best[c] = min(best.get(c, np.inf), _value(r, value))
  return sorted([c, v] for c, v in best.items())


def _fit_points(points: list[list[float]]) -> dict | None:
  return power_law_fit(*np.asarray(points, float).reshape(-1, 2).T)


def analyse(runs: Sequence[dict], eval_metric: str) -> dict:
  """The study's fits of `runs` (records of `run_study`): isoflops (`isoflop_curves`),
  frontier ({"final_loss": [[compute, best]], eval_metric: [...]}, `frontier`),
  fit_loss and fit_eval (`power_law_fit` of the frontiers), optimal_size ({family:
  {"compute", "params", "at_edge", "fit"}}: the interior isoFLOP optima and their fit; the
  budgets whose optimum lies at the edge of the sizes tried are listed, not fitted)."""
  curves = isoflop_curves(runs)
  optimal = {}
  for family in sorted({c["family"] for c in curves}):
    inside = [c for c in curves if c["family"] == family and c["interior"]]
    compute = [c["budget_gflops"] for c in inside]
    params = [c["opt_params"] for c in inside]
    edge = [c["budget_gflops"] for c in curves if c["family"] == family and not c["interior"]]
    fit = power_law_fit(compute, params)
    optimal[family] = {"compute": compute, "params": params, "at_edge": edge, "fit": fit}
  loss, scores = frontier(runs, "final_loss"), frontier(runs, eval_metric)
  return {
    "isoflops": curves,
    "frontier": {"final_loss": loss, eval_metric: scores},
    "fit_loss": _fit_points(loss),
    "fit_eval": _fit_points(scores),
    "optimal_size": optimal,
  }


# ---- The study ---------------------------------------------------------------------------


def run_study(
  models: Sequence[dict],
  root: str,
  out: str,
  *,
  base_spec: str = "configs/digits.py",
  common: dict | None = None,
  scale: float = 6,
  budgets: Sequence[float] = (),
  train: bool = True,
  evaluate: bool | None = None,
  train_fn: sweep.TrainFn | None = None,
) -> dict:
  """Trains (or resumes) every run through `sweep.run_sweep`, fits, writes <out>.json/.png.

  models: override dicts (`sweep_spec`); with `budgets` (GFLOPs) each model trains once per
  budget (`budget_overrides`), else each trains base total_steps. train=False only reads
  what the run directories hold (re-fit and re-plot a partial study). evaluate: score each
  finished run with dit.evaluate (default: when the base config has an eval section).
  train_fn: the trainer (`sweep.train_run`; tests pass a stand-in).
  """
  base = sweep.apply_overrides(cli.load_config(base_spec), common or {})
  evaluate = "eval" in base if evaluate is None else evaluate
  arms, budget_of = [], []
  for model in models:
    for budget in budgets or [None]:
      extra = budget_overrides(base, model, budget) if budget is not None else {}
      arms.append({**model, **extra})
      budget_of.append(budget)
  records = sweep.run_sweep(base, arms, root, evaluate=evaluate, train=train, train_fn=train_fn)
  runs = [
    study_record(base, rec, budget, scale) for rec, budget in zip(records, budget_of, strict=True)
  ]
  metric = "digits_fd" if base.get("eval", {}).get("metric") == "digits" else "fid"
  results = {
    "base": base_spec,
    "common": common or {},
    "scale": scale,
    "budgets": list(budgets),
    "eval_metric": metric,
    "runs": runs,
    **analyse(runs, metric),
  }
  write_results(results, out)
  return results


def study_record(base, record: dict, budget: float | None, scale: float) -> dict:
  """A sweep record with the model's size and compute: label, family (patch), params,
  tokens, gflops, budget_gflops, train_gflops, finished, curve ([compute, loss] rows) and
  eval (the scores)."""
  config = sweep.apply_overrides(base, record["overrides"])
  info = train_gflops(config)
  per_step = info["gflops_train"] * config.batch_size
  rows = sweep.read_metrics(record["workdir"])
  return {
    "label": run_label(record["overrides"], scale),
    "family": f"p{config.model.patch_size}",
    "overrides": record["overrides"],
    "workdir": record["workdir"],
    "status": record["status"],
    "finished": record["status"] == "finished",
    "params": info["params"],
    "tokens": info["tokens"],
    "gflops_fwd": info["gflops_fwd"],
    "gflops_train_per_image": info["gflops_train"],
    "budget_gflops": budget,
    "steps": record["steps"],
    "train_gflops": per_step * record["steps"],
    "final_loss": record["final_loss"],
    "curve": [[r["step"] * per_step, r["loss"]] for r in rows],
    "eval": {k: v for k, v in record.items() if k not in RUN_KEYS},
  }


def write_results(results: dict, out: str) -> None:
  """<out>.json (atomically), then <out>.png plotted from that file (`plot_study`)."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  sweep.write_json(out + ".json", results)
  plot_study(out + ".json", out + ".png")


def plot_study(json_path: str, png_path: str) -> None:
  """The study's figure, from its JSON: loss curves against compute with the frontier's fit;
  isoFLOP curves; compute-optimal size against compute; the eval metric against compute."""
  with open(json_path) as f:
    results = json.load(f)
  runs = [r for r in results["runs"] if r["curve"]]
  metric = results["eval_metric"]
  with_eval = [r for r in runs if r["finished"] and r["eval"].get(metric) is not None]
  panels = ["loss", *(["isoflop", "optimal"] if results["isoflops"] else [])]
  panels += ["eval"] if with_eval else []
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
  ax = dict(zip(panels, axes[0], strict=True))
  labels = list(dict.fromkeys(r["label"] for r in runs))
  color = {label: f"C{i % 10}" for i, label in enumerate(labels)}
  compute = [r["train_gflops"] for r in runs if r["train_gflops"] > 0] or [1.0]
  lo, hi = min(compute), max(compute)

  for r in runs:
    curve = np.asarray(r["curve"])
    ax["loss"].plot(curve[:, 0], curve[:, 1], color=color[r["label"]], alpha=0.6, lw=1)
    if r["finished"]:
      ax["loss"].plot([r["train_gflops"]], [r["final_loss"]], "o", color=color[r["label"]])
  for label in labels:  # One legend entry per model.
    ax["loss"].plot([], [], "o-", color=color[label], label=label)
  if results["budgets"] and results["frontier"]["final_loss"]:
    c, best = np.asarray(results["frontier"]["final_loss"]).T
    ax["loss"].plot(c, best, "s", color="k", mfc="none", ms=8, label="best per budget")
  plots.power_law(ax["loss"], results["fit_loss"], lo, hi)
  title = "best loss per budget" if results["budgets"] else "final loss"
  ax["loss"].set(xscale="log", yscale="log", xlabel="training compute (GFLOPs)", ylabel="loss")
  ax["loss"].set_title(title, fontsize=9)
  ax["loss"].legend(fontsize=7)

  if "isoflop" in ax:
    for i, c in enumerate(results["isoflops"]):
      label = f"{c['budget_gflops']:.3g} GFLOPs"
      if _families(results) > 1:
        label += f" ({c['family']})"
      ax["isoflop"].plot(c["params"], c["values"], "o", color=f"C{i % 10}", label=label)
      if c["parabola"]:
        n = np.geomspace(min(c["params"]), max(c["params"]), 64)
        fit = np.polyval(c["parabola"], np.log(n))
        shown = fit > 0.5 * min(c["values"])  # A one-sided curve's parabola dives below 0.
        ax["isoflop"].plot(n, np.where(shown, fit, np.nan), "-", color=f"C{i % 10}", lw=1)
      marker = "*" if c["interior"] else "^"
      ax["isoflop"].plot([c["opt_params"]], [c["opt_value"]], marker, color="k", ms=9)
    ax["isoflop"].set(xscale="log", yscale="log", xlabel="parameters", ylabel="final loss")
    # The sizes span more than a decade: its minor-tick labels would overlap.
    ax["isoflop"].tick_params(axis="x", which="minor", labelbottom=False)
    ax["isoflop"].set_title("isoFLOP curves (* optimum, ^ at the edge)", fontsize=9)
    ax["isoflop"].legend(fontsize=7)
    for i, (family, opt) in enumerate(results["optimal_size"].items()):
      if opt["compute"]:
        ax["optimal"].plot(opt["compute"], opt["params"], "*", color=f"C{i}", ms=9, label=family)
        span = min(opt["compute"]), max(opt["compute"])
        plots.power_law(ax["optimal"], opt["fit"], *span, color=f"C{i}")
    ax["optimal"].set(xscale="log", yscale="log", xlabel="training compute (GFLOPs)")
    ax["optimal"].set(ylabel="compute-optimal parameters")
    if ax["optimal"].get_legend_handles_labels()[0]:
      ax["optimal"].legend(fontsize=7)

  if "eval" in ax:
    for r in with_eval:
      ax["eval"].plot([r["train_gflops"]], [r["eval"][metric]], "o", color=color[r["label"]])
    plots.power_law(ax["eval"], results["fit_eval"], lo, hi)
    ax["eval"].set(xscale="log", yscale="log", xlabel="training compute (GFLOPs)", ylabel=metric)
    if ax["eval"].get_legend_handles_labels()[0]:
      ax["eval"].legend(fontsize=7)
  plots.save(fig, png_path)


def _families(results: dict) -> int:
  return len({c["family"] for c in results["isoflops"]})


# ---- Command line ------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags, defined only when run as a command (the module imports cleanly)."""
  flags.DEFINE_string("base", "configs/digits.py", "Base config (path.py[:arg]).")
  flags.DEFINE_float("scale", None, "Divide preset width/depth by this (default: 6 on digits).")
  flags.DEFINE_list("sizes", ["S", "B"], "Model sizes (S, B, L, XL).")
  flags.DEFINE_list("patches", ["4", "2"], "Patch sizes.")
  flags.DEFINE_list("budgets", [], "Training compute per run in GFLOPs (isoFLOP study).")
  flags.DEFINE_integer("total_steps", None, "Train steps of every run (without --budgets).")
  flags.DEFINE_list("set", [], "More overrides key=value (Python literals), e.g. data.path=/x.")
  flags.DEFINE_bool("evaluate", None, "Score runs with dit.evaluate (default: if eval in base).")
  flags.DEFINE_string("workdir", "runs/scaling", "Root of the per-run workdirs.")
  flags.DEFINE_string("out", "runs/scaling/scaling", "Output prefix (.json, .png).")
  flags.DEFINE_bool("plot_only", False, "Only collect, fit and plot what the run dirs hold.")


def _floats(name: str, items: Sequence[str]) -> list[float]:
  try:
    values = [float(v) for v in items]
  except ValueError as e:
    raise UserError(f"--{name} takes numbers, got {','.join(items)!r}.") from e
  if any(not v > 0 for v in values):
    raise UserError(f"--{name} takes positive numbers, got {values}.")
  return values


def main(argv):
  del argv
  digits = FLAGS.base.startswith(("configs/digits.py", str(ROOT / "configs/digits.py")))
  common = dict(DIGITS_SCALING) if digits else {}
  scale = FLAGS.scale or (6.0 if digits else 1.0)
  budgets = _floats("budgets", FLAGS.budgets)
  if FLAGS.total_steps and budgets:
    raise UserError("--total_steps and --budgets exclude each other (a budget sets the steps).")
  if FLAGS.total_steps:
    common.update(total_steps=FLAGS.total_steps, ckpt_every=FLAGS.total_steps)
  # Typed by the base config (and the DiT defaults): a bad key or value stops here, in one line.
  common.update(
    cli.parse_overrides(cli.load_config(FLAGS.base), FLAGS.set, defaults=sweep.MODEL_DEFAULTS)
  )
  try:
    patches = [int(p) for p in FLAGS.patches]
  except ValueError as e:
    raise UserError(f"--patches takes integers, got {','.join(FLAGS.patches)!r}.") from e
  try:
    models = sweep_spec(FLAGS.sizes, patches, scale)
  except ValueError as e:
    raise UserError(str(e)) from e
  results = run_study(
    models,
    FLAGS.workdir,
    FLAGS.out,
    base_spec=FLAGS.base,
    common=common,
    scale=scale,
    budgets=budgets,
    train=not FLAGS.plot_only,
    evaluate=FLAGS.evaluate,
  )
  fits = ("fit_loss", "fit_eval")
  print(json.dumps({k: results[k] and {x: results[k][x] for x in ("b", "b_ci")} for k in fits}))


if __name__ == "__main__":
  cli.run_command(main, define_flags, __doc__)
