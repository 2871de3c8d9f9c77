r"""Sweeps: a base config, a list of arms (config overrides), one resumable run per arm.

  python -m experiments.sweep --config=configs/digits.py --workdir=runs/lr \
      --grid=optim.lr=1e-4,3e-4,1e-3 --grid=model.hidden_size=64,128 [--config.total_steps=500]
  # The same command again finishes only the runs that are missing; --plot_only rewrites
  # runs/lr/sweep.json and sweep.png from the run directories without training.

An arm is a dict of dotted config overrides, e.g. {"model.block": "in_context"} or
{"sample.sampler": "dpmpp_2m", "sample.steps": 10}; a --grid sweep is the product of its
grids (the first --grid varies slowest). Each arm trains in its own workdir `root/<slug>`,
where the slug names the overrides that change training (sample.* and eval.* do not: arms
differing only in sampling share one trained model).

Finished, resumed, restarted. A run is finished when its workdir holds result.json, which is
written atomically (temporary file + rename) once training has returned: its status, steps and
final loss. A run that stopped on non-finite losses gets status "diverged" there: rerunning it
would diverge again, so it is final too. A run without result.json is trained again by
dit.train.train_and_evaluate, which resumes from the workdir's last checkpoint (every
config.ckpt_every steps) and drops the metrics.jsonl rows logged after it, so the rerun ends
with the parameters of an uninterrupted run; with no checkpoint yet it starts from step 0.
Evaluations are cached in eval_<sampler>_<steps>_cfg<scale>_n<num>.json (also atomic). A
workdir whose config.json differs from its arm's config in a training key is an error (not a
silent reuse): a sweep with other settings needs another root.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from dit import checkpoint, cli
from dit.cli import UserError
from dit.models import dit as dit_model
from experiments import plots

Overrides = Mapping[str, Any]
TrainFn = Callable[[ml_collections.ConfigDict, str], Any]
# Overrides of these sections change only how a trained model is sampled and scored.
EVAL_ONLY_SECTIONS = ("sample", "eval")
# Keys that change how a run is logged, saved or computed, not what it learns: a finished run
# stays this arm's run when they change.
NON_TRAINING_KEYS = (
  "log_every",
  "ckpt_every",
  "keep_ckpts",
  "sample_every",
  "progress_bar",
  "max_bad_steps",
  "distributed",
  "parallelism",
  "mesh",
  "step_remat_policy",
  *checkpoint.COMPUTE_ONLY_KEYS,
)
RESULT = "result.json"  # Written last: a run is finished when its workdir holds it.
STATUSES = ("finished", "diverged", "partial", "missing")
METRICS = ("final_loss", "eps_mse", "accuracy", "digits_fd", "fid")  # What a summary plots.
LOWER_IS_BETTER = {"final_loss": True, "eps_mse": True, "digits_fd": True, "fid": True}


# DiT fields a config may leave out (configs list only the model fields they change from
# the defaults): an override of one adds it, type-checked against its default.
MODEL_DEFAULTS = {
  f"model.{name}": field.default
  for name, field in dit_model.DiT.__dataclass_fields__.items()
  if name not in ("parent", "name")
}

load_base = cli.load_config  # A config from `path.py[:arg]` (as the dit commands read --config).


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Overrides
) -> ml_collections.ConfigDict:
  """A locked copy of `config` with dotted-key overrides applied (`cli.apply_overrides`).

  Keys must exist in the config, except DiT fields under "model." (MODEL_DEFAULTS, e.g.
  model.qk_norm), which are added. A bad key or value is a `cli.UserError`.
  """
  return cli.apply_overrides(config, overrides, defaults=MODEL_DEFAULTS)


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value of a dotted key; a model field absent from the config has the DiT default."""
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  if leaf not in node and key in MODEL_DEFAULTS:
    return MODEL_DEFAULTS[key]
  return node[leaf]


def train_overrides(base: ml_collections.ConfigDict, overrides: Overrides) -> dict[str, Any]:
  """The overrides that change training (not sample.*/eval.*, not equal to the base)."""
  return {
    k: v
    for k, v in overrides.items()
    if k.split(".")[0] not in EVAL_ONLY_SECTIONS and get(base, k) != v
  }


def slug(overrides: Overrides) -> str:
  """A readable directory name for a set of overrides ("base" for none)."""
  if not overrides:
    return "base"
  text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items()))
  text = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)
  if len(text) > 80:  # Long sweeps: keep it readable and unique.
    text = text[:60] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
  return text


def arm_workdir(base: ml_collections.ConfigDict, overrides: Overrides, root: str) -> str:
  """root/<slug of the arm's training overrides>."""
  return os.path.join(root, slug(train_overrides(base, overrides)))


# ---- Grids -------------------------------------------------------------------------------


def _split_values(text: str) -> list[str]:
  """ "1e-4,3e-4" -> ["1e-4", "3e-4"]; commas inside brackets or quotes do not split."""
  values, current, depth, quote = [], "", 0, None
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      values.append(current.strip())
      current = ""
      continue
    current += ch
  return [*values, current.strip()]


def parse_grid(base: ml_collections.ConfigDict, items: Sequence[str]) -> dict[str, list]:
  """{dotted key: [values]} of --grid items "key=v1,v2,..." (values typed by the base config,
  as --config.key=value is; DiT fields absent from the config by their defaults).

  An item "k1:k2=a1:a2,b1:b2" is one axis over several keys that change together (e.g. the
  width and the head count, so that the head dimension stays): its key is "k1:k2" and its
  values are tuples.

  Raises UserError for an item that is not key=v1,..., an empty value, a key given twice, a
  value listed twice, a joint value with the wrong number of parts, or a key or value the
  config rejects.
  """
  grid: dict[str, list] = {}
  for item in items:
    key, sep, text = item.partition("=")
    key = key.strip()
    keys = [k.strip() for k in key.split(":")]
    if not sep or not all(keys) or not text.strip():
      raise UserError(
        f"--grid={item!r} is not of the form key=v1,v2,... (e.g. optim.lr=1e-4,3e-4)."
      )
    if key in grid or any(k in _grid_keys(grid) for k in keys) or len(set(keys)) < len(keys):
      raise UserError(f"--grid gives {key!r} twice; list all its values in one --grid.")
    values = []
    for value in _split_values(text):
      parts = value.split(":") if len(keys) > 1 else [value]
      if not all(parts):
        raise UserError(f"--grid={item!r} has an empty value.")
      if len(parts) != len(keys):
        raise UserError(
          f"--grid={item!r}: value {value!r} has {len(parts)} parts, expected {len(keys)} "
          f"(one per key of {key!r}, joined by ':')."
        )
      overrides = [f"{k}={v}" for k, v in zip(keys, parts, strict=True)]
      parsed = cli.parse_overrides(base, overrides, defaults=MODEL_DEFAULTS)
      parsed = tuple(parsed[k] for k in keys) if len(keys) > 1 else parsed[key]
      if parsed in values:
        raise UserError(f"--grid={item!r} lists {parsed!r} twice.")
      values.append(parsed)
    grid[key] = values
  return grid


def _grid_keys(grid: Mapping[str, Sequence]) -> list[str]:
  """The config keys a grid sets (a joint axis "k1:k2" sets k1 and k2)."""
  return [k for key in grid for k in key.split(":")]


def grid_arms(grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
  """The product of the grids, one override dict per arm; the first key varies slowest."""
  arms = []
  for combo in itertools.product(*grid.values()):
    arm = {}
    for key, value in zip(grid, combo, strict=True):
      keys = key.split(":")
      arm.update(zip(keys, value if len(keys) > 1 else [value], strict=True))
    arms.append(arm)
  return arms


# ---- Reading runs back -------------------------------------------------------------------


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` to `path` atomically: a reader sees the old file or the whole new one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> Any | None:
  """The JSON in `path`, None if it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def read_metrics(workdir: str) -> list[dict]:
  """The rows of workdir/metrics.jsonl, one per step: the training row and the evaluation row
  (eval/...) of a step are merged; a resumed run may repeat steps: the last value wins."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # A line torn by a kill: the rerun rewinds it.
          continue
        rows.setdefault(row["step"], {}).update(row)
  return [rows[s] for s in sorted(rows)]


def final_loss(rows: list[dict], fraction: float = 0.1) -> float | None:
  """Mean logged training loss over the last `fraction` of the logged steps (less noisy)."""
  rows = [r for r in rows if "loss" in r]  # Not the evaluation-only rows.
  if not rows:
    return None
  last = rows[-1]["step"]
  tail = [r["loss"] for r in rows if r["step"] >= last * (1.0 - fraction)]
  return float(np.mean(tail))


def read_result(workdir: str) -> dict | None:
  """workdir/result.json: {"status": "finished" | "diverged", "steps", "final_loss", ...}."""
  result = read_json(os.path.join(workdir, RESULT))
  return result if isinstance(result, dict) and result.get("status") in STATUSES else None


def run_status(workdir: str) -> str:
  """ "finished" or "diverged" (result.json), "partial" (begun) or "missing"."""
  result = read_result(workdir)
  if result is not None:
    return result["status"]
  begun = read_metrics(workdir) or os.path.isdir(os.path.join(workdir, "ckpt"))
  return "partial" if begun else "missing"


def config_mismatch(workdir: str, config: ml_collections.ConfigDict) -> list[tuple]:
  """(dotted key, workdir's config.json value, config's value) for each training key that
  differs ([] without config.json); sample.*, eval.* and NON_TRAINING_KEYS are not compared."""
  old = read_json(os.path.join(workdir, "config.json"))
  if old is None:
    return []
  new = json.loads(config.to_json_best_effort())
  sections = sorted((set(old) | set(new)) - set(EVAL_ONLY_SECTIONS))
  return cli.config_diffs(old, new, sections, ignore=NON_TRAINING_KEYS)


def check_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """UserError if `workdir` holds a run of another training config than `config`."""
  diffs = config_mismatch(workdir, config)
  if diffs:
    raise UserError(
      f"{workdir} holds a run of another config ({checkpoint.describe_changes(diffs)}); use "
      "another sweep root (--workdir) or delete that run directory."
    )


def _progress(workdir: str) -> dict:
  """steps, final_loss, steps_per_sec of the rows metrics.jsonl holds so far."""
  rows = read_metrics(workdir)
  record = {"steps": rows[-1]["step"] if rows else 0, "final_loss": final_loss(rows)}
  rates = [r["steps_per_sec"] for r in rows[1:] or rows if "steps_per_sec" in r]
  if rates:
    record["steps_per_sec"] = float(np.median(rates))
  return record


# ---- Training and evaluating one arm -----------------------------------------------------


def eps_mse(config, model, params, *, num: int = 512, seed: int = 1234) -> float:
  """Noise-prediction MSE on `num` training images at uniform t, with fixed noise.

  Whatever the prediction type, the output is converted to eps first, so arms that train
  with different targets or weightings are compared on one scale (the DDPM "simple" loss).
  """
  from dit.data import pipeline
  from dit.diffusion import schedules

  it = pipeline.make_train_iterator(config.data, global_batch_size=num, seed=seed)
  batch = next(it)
  x0 = jnp.asarray(batch["latent"] if "latent" in batch else batch["image"])
  cond = {"label": jnp.asarray(batch["label"])} if config.model.num_classes else None
  schedule = schedules.from_config(config.diffusion)
  k_t, k_noise = jax.random.split(jax.random.PRNGKey(seed))
  t = jax.random.randint(k_t, (num,), 0, schedule.T)
  noise = jax.random.normal(k_noise, x0.shape)

  @jax.jit
  def mse(params):
    x_t = schedules.q_sample(schedule, x0, t, noise)
    out = model.apply({"params": params}, x_t, t, cond)[..., : x0.shape[-1]]
    a = schedule.sqrt_alphas_cumprod[t]
    s = schedule.sqrt_one_minus_alphas_cumprod[t]
    _, eps = schedules.to_x0_eps(out, x_t, a, s, config.diffusion.prediction)
    return jnp.mean((eps - noise) ** 2)

  return float(mse(params))


def eval_name(config: ml_collections.ConfigDict) -> str:
  s, e = config.sample, config.eval
  return f"eval_{s.sampler}_{s.steps}_cfg{s.cfg_scale:g}_n{e.num_samples}.json"


def _default_train_fn(config: ml_collections.ConfigDict, workdir: str):
  from dit import train

  return train.train_and_evaluate(config, workdir)


def train_run(config: ml_collections.ConfigDict, workdir: str, train_fn: TrainFn | None = None):
  """Trains (or resumes) the run in `workdir`, then writes its result.json; returns the
  trainer's state (None if it diverged).

  train_fn(config, workdir): dit.train.train_and_evaluate unless given (tests inject
  failures through it). A FloatingPointError (non-finite losses) is recorded as "diverged";
  any other error propagates and leaves the run partial, to be resumed by a rerun.
  """
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
  resuming = run_status(workdir) == "partial"
  print(f"{'Resuming' if resuming else 'Training'} {workdir}", flush=True)
  state, status, error = None, "finished", None
  try:
    state = (train_fn or _default_train_fn)(config, workdir)
  except FloatingPointError as e:
    status, error = "diverged", " ".join(str(e).split())
    print(f"Diverged: {workdir}: {error}", flush=True)
  result = {"status": status, "total_steps": config.total_steps, **_progress(workdir)}
  if status == "diverged":
    result.update(final_loss=None, error=error)
  elif result["steps"] < config.total_steps:
    raise RuntimeError(
      f"{workdir}: training returned at step {result['steps']} of {config.total_steps}."
    )
  write_json(os.path.join(workdir, RESULT), result)
  return state


def run_arm(
  base: ml_collections.ConfigDict,
  overrides: Overrides,
  root: str,
  *,
  evaluate: bool = True,
  train: bool = True,
  train_fn: TrainFn | None = None,
) -> dict:
  """Trains (resumes, or skips if finished) one arm, evaluates it, returns its record.

  The record: {"overrides", "workdir", "status" (STATUSES), "steps", "final_loss",
  "steps_per_sec", and, for a finished run with `evaluate`, eps_mse and the dit.evaluate
  metrics (accuracy, digits_fd or fid, ...)}. train=False trains and evaluates nothing: the
  record holds what the run directory holds (a cached evaluation included).
  """
  config = apply_overrides(base, overrides)
  workdir = arm_workdir(base, overrides, root)
  check_run_config(workdir, config)
  state = None
  if train and run_status(workdir) in ("partial", "missing"):
    state = train_run(config, workdir, train_fn)
  status = run_status(workdir)
  record = {"overrides": dict(overrides), "workdir": workdir, "status": status}
  result = read_result(workdir)
  record.update(_progress(workdir))
  if result is not None:
    record.update({k: result[k] for k in ("steps", "final_loss", "steps_per_sec") if k in result})
  if not evaluate or status != "finished":
    return record

  path = os.path.join(workdir, eval_name(config))
  scores = read_json(path)
  if scores is None and train:
    scores = _evaluate(config, workdir, state)
    write_json(path, scores)
  record.update(scores or {})
  return record


def _evaluate(config: ml_collections.ConfigDict, workdir: str, state) -> dict:
  from dit import evaluation, generate

  key = "ema_params" if config.sample.use_ema else "params"
  if isinstance(state, Mapping) and key in state:
    model, params = dit_model.build_model(config.model), state[key]
  else:
    model, params = generate.load_params(config, workdir, use_ema=config.sample.use_ema)
  scores = evaluation.evaluate(config, model, params, jax.random.PRNGKey(config.seed))
  if "diffusion" in config:  # Flow-matching models have no discrete eps scale.
    scores["eps_mse"] = eps_mse(config, model, params)
  return {k: v for k, v in scores.items() if not k.startswith("accuracy_class")}


def run_sweep(
  base: ml_collections.ConfigDict,
  arms: Sequence[Overrides],
  root: str,
  *,
  evaluate: bool = False,
  train: bool = True,
  train_fn: TrainFn | None = None,
  on_record: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
  """`run_arm` of every arm in order; returns their records.

  A stopped sweep rerun with the same arguments trains only the arms that are not finished.
  on_record(records so far) runs after each arm (e.g. to write a summary as the sweep goes).
  Raises ValueError if two arms with different training overrides would share a workdir.
  """
  seen: dict[str, dict] = {}
  for arm in arms:
    overrides = train_overrides(base, arm)
    other = seen.setdefault(arm_workdir(base, arm, root), overrides)
    if other != overrides:
      raise ValueError(f"Arms {other} and {overrides} map to one workdir; rename a key.")
  records = []
  for i, arm in enumerate(arms, 1):
    record = run_arm(base, arm, root, evaluate=evaluate, train=train, train_fn=train_fn)
    records.append(record)
    loss = record["final_loss"]
    loss = f", final_loss={loss:.4g}" if loss is not None else ""
    print(f"[{i}/{len(arms)}] {os.path.basename(record['workdir'])}: {record['status']}{loss}")
    if on_record is not None:
      on_record(records)
  return records


# ---- Summaries ---------------------------------------------------------------------------


def optima(records: list[dict], x: str, metric: str = "final_loss") -> list[dict]:
  """The best value of `x` for each combination of the other overrides (finished runs).

  E.g. x="optim.lr" with a width grid: the optimal learning rate per width. Returns
  [{"group": {other overrides}, x: best value, metric: its value, "of": runs compared}].
  """
  lower = LOWER_IS_BETTER.get(metric, False)
  groups: dict[str, list[dict]] = {}
  for r in records:
    if r["status"] == "finished" and r.get(metric) is not None and x in r["overrides"]:
      groups.setdefault(group_label(r, x), []).append(r)
  best = []
  for rs in groups.values():
    pick = (min if lower else max)(rs, key=lambda r: r[metric])
    group = {k: v for k, v in pick["overrides"].items() if k != x}
    best.append({"group": group, x: pick["overrides"][x], metric: pick[metric], "of": len(rs)})
  return best


def group_label(record: dict, x: str | None) -> str:
  """The overrides of a record other than `x`, as "key=value, ..." ("base" for none)."""
  items = [(k, v) for k, v in record["overrides"].items() if k != x]
  return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in items) or "base"


def summarise(records: list[dict], *, x: str | None = None, **header) -> dict:
  """The summary JSON of a sweep: `header` (config, overrides, grid), "x", "runs", the
  status "counts" and, with an x key, the "optima" of each metric the runs have."""
  counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
  summary = {**header, "x": x, "counts": counts, "runs": records}
  if x is not None:
    summary["optima"] = {
      m: optima(records, x, m) for m in METRICS if any(r.get(m) is not None for r in records)
    }
  return summary


def write_summary(summary: dict, out: str) -> None:
  """<out>.json (the summary, atomically), then <out>.png plotted from that file."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  write_json(out + ".json", summary)
  plot_summary(out + ".json", out + ".png")


def plot_summary(json_path: str, png_path: str) -> None:
  """Each metric of the summary's finished runs against its x key (one line per combination
  of the other overrides, a star at each line's optimum; diverged runs an x on the top
  edge); without an x key, against the run's index."""
  with open(json_path) as f:
    summary = json.load(f)
  runs, x = summary["runs"], summary.get("x")
  metrics = [m for m in METRICS if any(r.get(m) is not None for r in runs)] or ["final_loss"]
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics) + 1, 3.6), squeeze=False)

  def x_of(r):
    return r["overrides"][x] if x else runs.index(r)

  finished = [r for r in runs if r["status"] == "finished"]
  xs = [x_of(r) for r in runs]
  numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in xs)
  for ax, metric in zip(axes[0], metrics, strict=True):
    plots.lines(ax, finished, x_of, metric, by=lambda r: group_label(r, x))
    for best in summary.get("optima", {}).get(metric, []):
      ax.plot([best[x]], [best[metric]], "*", color="k", ms=10, zorder=3)
    diverged = [x_of(r) for r in runs if r["status"] == "diverged"]
    if diverged and numeric:
      top = ax.get_xaxis_transform()  # x in data units, y in axes units: the top edge.
      ax.plot(diverged, [1.0] * len(diverged), "x", color="red", clip_on=False, transform=top)
    log_x = numeric and min(xs) > 0 and max(xs) >= 10 * min(xs)
    ax.set(xlabel=x or "run", ylabel=metric, xscale="log" if log_x else "linear")
    if metric in LOWER_IS_BETTER and all(r[metric] > 0 for r in finished if r.get(metric)):
      ax.set_yscale("log")
  if axes[0][0].get_legend_handles_labels()[0]:
    axes[0][0].legend(fontsize=7)
  counts = summary.get("counts", {})
  fig.suptitle(", ".join(f"{n} {s}" for s, n in counts.items() if n), fontsize=9)
  plots.save(fig, png_path)


# ---- Command line ------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags, defined only when run as a command (the module imports cleanly)."""
  cli.define_config_flags(workdir_help="Root of the sweep: one directory per run under it.")
  flags.DEFINE_multi_string(
    "grid",
    [],
    "key=v1,v2,... : one axis of the sweep (repeat for a product), e.g. optim.lr=1e-4,1e-3.",
  )
  flags.DEFINE_string("out", "", "Summary prefix (.json, .png); default: WORKDIR/sweep.")
  flags.DEFINE_string("x", "", "The key the plot puts on its x axis; default: the first --grid.")
  flags.DEFINE_bool("evaluate", False, "Also score each finished run with dit.evaluate (cached).")
  flags.DEFINE_bool("plot_only", False, "Train nothing: summarise and plot what the runs hold.")


def main(argv):
  del argv
  if FLAGS.config is None:
    raise UserError("--config is required (the base config), e.g. --config=configs/digits.py")
  if FLAGS.config_keys:
    print(cli.config_keys_text(FLAGS.config))
    return
  if not FLAGS.workdir:
    raise UserError("--workdir is required: the root of the runs' directories.")
  base = FLAGS.config
  base.lock()
  grid = parse_grid(base, FLAGS.grid)
  x = FLAGS.x or next(iter(_grid_keys(grid)), None)
  if x and x not in _grid_keys(grid):
    raise UserError(f"--x={x!r} is not a --grid key; expected one of {_grid_keys(grid)}.")
  out = FLAGS.out or os.path.join(FLAGS.workdir, "sweep")
  header = {
    "config": flags.FLAGS["config"].config_filename,
    "overrides": {k: v for k, v in flags.FLAGS["config"].override_values.items()},
    "grid": grid,
    "workdir": FLAGS.workdir,
  }
  records = run_sweep(
    base,
    grid_arms(grid),
    FLAGS.workdir,
    evaluate=FLAGS.evaluate,
    train=not FLAGS.plot_only,
    on_record=lambda rs: write_summary(summarise(rs, x=x, **header), out),
  )
  summary = summarise(records, x=x, **header)
  write_summary(summary, out)
  print(json.dumps({"counts": summary["counts"], "summary": out + ".json"}))


if __name__ == "__main__":
  cli.run_command(main, define_flags, __doc__)
