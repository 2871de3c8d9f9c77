"""What scaling.py and ablations.py share: config overrides, one run, reading results back.

A sweep is a list of arms; an arm is a dict of dotted config overrides, e.g.
  {"model.block": "in_context"} or {"sample.sampler": "dpmpp_2m", "sample.steps": 10}.
Each arm trains in its own workdir `root/<slug>`, where the slug names the overrides that
change training (sample.* and eval.* do not: arms differing only in sampling share one
trained model). Everything a summary needs is on disk (metrics.jsonl, config.json,
eval_*.json), so a sweep that was stopped half way is resumed or re-plotted by running
the same command again: finished runs are not retrained, finished evaluations not redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit import cli
from dit.models import dit as dit_model

Overrides = Mapping[str, Any]
# Overrides of these sections change only how a trained model is sampled and scored.
EVAL_ONLY_SECTIONS = ("sample", "eval")


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


def read_metrics(workdir: str) -> list[dict]:
  """The rows of workdir/metrics.jsonl (a resumed run may repeat steps: the last one wins)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        row = json.loads(line)
        rows[row["step"]] = row
  return [rows[s] for s in sorted(rows)]


def final_loss(rows: list[dict], fraction: float = 0.1) -> float | None:
  """Mean logged training loss over the last `fraction` of the logged steps (less noisy)."""
  if not rows:
    return None
  last = rows[-1]["step"]
  tail = [r["loss"] for r in rows if r["step"] >= last * (1.0 - fraction)]
  return float(np.mean(tail))


def is_trained(workdir: str, config: ml_collections.ConfigDict) -> bool:
  rows = read_metrics(workdir)
  return bool(rows) and rows[-1]["step"] >= config.total_steps


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


def run_arm(
  base: ml_collections.ConfigDict, overrides: Overrides, root: str, *, evaluate: bool = True
) -> dict:
  """Trains (or resumes, or skips if finished) one arm, evaluates it, returns its record.

  The record: {"overrides", "workdir", "steps", "final_loss", "eps_mse", and the
  dit.evaluate metrics (accuracy, digits_fd or fid, ...)}; evaluations are cached in
  workdir/eval_<sampler>_<steps>_cfg<scale>_n<num>.json.
  """
  from dit import evaluation, generate, train

  config = apply_overrides(base, overrides)
  workdir = os.path.join(root, slug(train_overrides(base, overrides)))
  os.makedirs(root, exist_ok=True)
  model = params = None
  if not is_trained(workdir, config):
    state = train.train_and_evaluate(config, workdir)
    model = dit_model.build_model(config.model)
    params = state["ema_params" if config.sample.use_ema else "params"]
  record = {"overrides": dict(overrides), "workdir": workdir}
  rows = read_metrics(workdir)
  record["steps"] = rows[-1]["step"]
  record["final_loss"] = final_loss(rows)
  if "steps_per_sec" in rows[-1]:
    record["steps_per_sec"] = float(np.median([r["steps_per_sec"] for r in rows[1:] or rows]))
  if not evaluate:
    return record

  path = os.path.join(workdir, eval_name(config))
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
  else:
    if params is None:
      model, params = generate.load_params(config, workdir, use_ema=config.sample.use_ema)
    result = evaluation.evaluate(config, model, params, jax.random.PRNGKey(config.seed))
    if "diffusion" in config:  # Flow-matching models have no discrete eps scale.
      result["eps_mse"] = eps_mse(config, model, params)
    result = {k: v for k, v in result.items() if not k.startswith("accuracy_class")}
    with open(path, "w") as f:
      json.dump(result, f, indent=2)
  record.update(result)
  return record
