"""The train loop on one device: outputs, logging, evaluation, resume, checkpoint fallback,
NaN guard, gradient accumulation, EMA, remat, mixed precision and bad input.

One shared run (`trained`) is inspected by most tests; train runs reuse compiled programs
through a persistent XLA cache, so each extra run costs little more than its steps.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, TINY_OVERRIDES, tiny_config

from dit import checkpoint, evaluation, generate, hardware, objectives, optim, train
from dit.data import pipeline
from dit.diffusion import schedules
from dit.models import dit as dit_model
from dit.models import flops

# Evaluation every 2 steps with a small digits eval, samples every 4 steps.
RUN = {
  "optim.schedule": "constant",
  "ckpt_every": 2,
  "eval.every": 2,
  "eval.num_samples": 20,
  "eval.batch_size": 20,
  "eval.best_metric": "digits_fd",
  "eval.best_mode": "min",
  "sample_every": 4,
  "sample.num": 20,  # = eval.batch_size: one sampler program for both.
  "progress_bar": True,
}


pytestmark = pytest.mark.usefixtures("compilation_cache")


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


abstract_state = train.abstract_state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """4 steps with checkpoints at 2 and 4, evaluation at 2 and 4, a sample grid at 4."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    state = train.train_and_evaluate(tiny_config(**RUN), workdir)
  return types.SimpleNamespace(
    workdir=workdir, state=jax.device_get(state), stdout=out.getvalue(), stderr=err.getvalue()
  )


def test_run_writes_workdir(trained):
  assert int(trained.state["step"]) == 4
  files = set(os.listdir(trained.workdir))
  assert {"config.json", "metrics.jsonl", "ckpt", "ckpt_best", "tb", "grid.png"} <= files
  tb = os.path.join(trained.workdir, "tb")
  events = b"".join(open(os.path.join(tb, name), "rb").read() for name in os.listdir(tb))
  assert b"samples" in events and b"PNG" in events  # The periodic grid as a TB image.
  assert os.listdir(os.path.join(trained.workdir, "samples")) == ["step_000004.png"]
  assert sorted(os.listdir(os.path.join(trained.workdir, "ckpt"))) == ["2", "4"]
  with open(os.path.join(trained.workdir, "config.json")) as f:
    assert json.load(f)["model"]["hidden_size"] == 32
  # The resolved config and a device summary on the console, and a progress bar with ETA.
  assert "devices: 1 (cpu" in trained.stdout and "hidden_size: 32" in trained.stdout
  assert "4/4" in trained.stderr and "<00:00" in trained.stderr


def first_step_reference(config):
  """(loss, grad_norm, initial params) of step 1 from the parts, without make_update_fn or
  the loop: the initial state (train.init_state), the first batch of the data pipeline, the
  documented per-example keys fold_in(fold_in(rng, step 0), i), the objective and jax.grad."""
  model = dit_model.build_model(config.model)
  tx, _ = optim.make_optimizer(config)
  apply = train.make_apply(model)
  objective = objectives.make_objective(config, apply, schedules.from_config(config.diffusion))
  data = next(
    pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  )
  n = config.batch_size
  batch = {"x0": jnp.asarray(data["image"]), "label": jnp.asarray(data["label"])}
  batch.update(generate.size_cond(config, n))

  @jax.jit
  def loss_and_norm():
    state = train.init_state(config, model, tx)
    step_key = jax.random.fold_in(state["rng"], 0)
    keys = jnp.stack([jax.random.fold_in(step_key, i) for i in range(n)])
    frozen = {"ema_params": state["ema_params"]}
    loss_fn = lambda p: objective.loss(p, dict(batch, keys=keys), frozen)[0]
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    return loss, optax.global_norm(grads), state["params"]

  loss, grad_norm, params = loss_and_norm()
  return float(loss), float(grad_norm), params


def test_metrics_rows(trained):
  rows = read_metrics(trained.workdir)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  for key in ("loss", "grad_norm", "lr", "steps_per_sec", "img_per_sec", "tflops_per_device"):
    assert all(np.isfinite(r[key]) and r[key] >= 0 for r in train_rows), key
  # Step 1's loss and gradient norm are those of the objective on the first batch at init.
  loss, grad_norm, _ = first_step_reference(tiny_config(**RUN))
  assert train_rows[0]["loss"] == pytest.approx(loss, rel=1e-5)
  assert train_rows[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
  assert len({r["loss"] for r in train_rows}) == 4  # A new batch and new draws every step.
  assert [r["lr"] for r in train_rows] == [pytest.approx(tiny_config().optim.lr)] * 4  # Constant.
  # Throughput: 8 images per step; model FLOPs (dit.models.flops) per image times images/s.
  last = train_rows[-1]
  assert last["img_per_sec"] == pytest.approx(8 * last["steps_per_sec"])
  model = dit_model.build_model(tiny_config(**RUN).model)
  flops_per_image = flops.model_info(model)["gflops_train"] * 1e9
  assert last["tflops_per_device"] == pytest.approx(flops_per_image * last["img_per_sec"] / 1e12)
  assert "mfu" not in last  # No peak FLOP/s for CPUs.
  eval_rows = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in eval_rows] == [2, 4]
  for r in eval_rows:
    # 20 class-balanced samples: each class accuracy is 0, 1/2 or 1, their mean the accuracy.
    per_class = [r[f"eval/accuracy_class_{k}"] for k in range(10)]
    assert set(per_class) <= {0.0, 0.5, 1.0}
    assert r["eval/accuracy"] == pytest.approx(np.mean(per_class))


def test_logged_evaluation_is_the_evaluation_of_the_saved_params(trained):
  """The step-4 eval row is evaluation.evaluate of the final EMA params (seed config.seed)."""
  config = tiny_config(**RUN)
  model = dit_model.build_model(config.model)
  results = evaluation.evaluate(
    config, model, trained.state["ema_params"], jax.random.PRNGKey(config.seed)
  )
  (row,) = [r for r in read_metrics(trained.workdir) if "eval/accuracy" in r and r["step"] == 4]
  for key in ("accuracy", "digits_fd", *(f"accuracy_class_{k}" for k in range(10))):
    assert row[f"eval/{key}"] == pytest.approx(results[key], rel=1e-5, abs=1e-9), key


def test_best_checkpoint_follows_eval_metric(trained):
  evals = {
    r["step"]: r["eval/digits_fd"] for r in read_metrics(trained.workdir) if "eval/digits_fd" in r
  }
  best = min(evals, key=evals.get)
  assert os.listdir(os.path.join(trained.workdir, "ckpt_best")) == [str(best)]


def test_sample_and_evaluate_load_ema_params(trained):
  config = tiny_config(**RUN)
  _, ema = generate.load_params(config, trained.workdir)
  _, raw = generate.load_params(config, trained.workdir, use_ema=False)
  tree_equal(ema, trained.state["ema_params"])
  tree_equal(raw, trained.state["params"])
  with pytest.raises(AssertionError):
    tree_equal(ema, raw)


def test_resume_is_bit_exact(trained, tmp_path, capsys):
  """Resuming from the step-2 checkpoint ends exactly where the straight run did."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained.workdir, workdir)
  shutil.rmtree(os.path.join(workdir, "ckpt", "4"))
  shutil.rmtree(os.path.join(workdir, "ckpt_best"))
  config = tiny_config(**{**RUN, "eval.every": 0, "sample_every": 0, "sample.num": 0})
  resumed = train.train_and_evaluate(config, workdir)
  assert int(resumed["step"]) == 4
  tree_equal(trained.state, resumed)
  # The changed settings are recorded (old -> new) at the restored step, and announced.
  (row,) = checkpoint.read_config_history(workdir)
  assert row["step"] == 2 and set(row["changes"]) == {"eval.every", "sample_every", "sample.num"}
  assert row["changes"]["eval.every"] == [2, 0] and row["changes"]["sample.num"] == [20, 0]
  assert "Config changes from" in capsys.readouterr().out
  # metrics.jsonl was rewound to step 2 before the resumed steps were appended.
  losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if "loss" in r]
  assert losses(workdir) == losses(trained.workdir)


def test_resume_toggles_scan_through_the_per_block_checkpoint(trained, tmp_path):
  """model.scan is compute-only: the unrolled run's step-2 checkpoint resumes scanned (whose
  train state holds the blocks stacked) and ends where the straight run did; the scanned run
  saves the per-block layout, which an unrolled config restores."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained.workdir, workdir)
  shutil.rmtree(os.path.join(workdir, "ckpt", "4"))
  shutil.rmtree(os.path.join(workdir, "ckpt_best"))
  off = {"eval.every": 0, "sample_every": 0, "sample.num": 0}
  scanned = tiny_config(**{**RUN, **off, "model.scan": True})
  assert train.setup(scanned).abstract_state["params"]["blocks"]["attn"]["qkv"]["kernel"].ndim == 3
  resumed = jax.device_get(train.train_and_evaluate(scanned, workdir))
  assert jax.tree.structure(resumed) == jax.tree.structure(trained.state)  # blocks_{i}.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), resumed, trained.state
  )
  mngr = checkpoint.manager(workdir, scanned)
  assert mngr.latest_step() == 4
  state, _ = checkpoint.restore(mngr, abstract_state(tiny_config(**{**RUN, **off})))
  tree_equal(state, resumed)


def test_resume_rejects_incompatible_config(trained, tmp_path):
  with pytest.raises(train.UserError, match="model.hidden_size: checkpoint has 32, config has 64"):
    train.train_and_evaluate(tiny_config(**{**RUN, "model.hidden_size": 64}), trained.workdir)
  # Without config.json, the checkpoint's own shapes name the differing parameters.
  shutil.copytree(os.path.join(trained.workdir, "ckpt"), tmp_path / "ckpt")
  config = tiny_config(**{"model.hidden_size": 64})
  mngr = checkpoint.manager(str(tmp_path), config)
  with pytest.raises(train.UserError, match=r"blocks_0/attn/qkv/kernel: checkpoint \(32, 96\), co"):
    checkpoint.restore(mngr, abstract_state(config))


def test_resume_allows_compute_only_changes_and_configs_older_than_their_keys(tmp_path):
  # A workdir from before model.scan / model.remat_policy existed, resumed with remat on.
  saved = json.loads(tiny_config().to_json_best_effort())
  del saved["model"]["scan"], saved["model"]["remat_policy"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  config = tiny_config(**{"model.remat": True, "model.scan": True, "optim.lr": 1e-3})
  changes = {key: (a, b) for key, a, b in train.check_resume_config(str(tmp_path), config)}
  assert changes["model.remat"] == (False, True) and changes["optim.lr"] == (2e-3, 1e-3)
  with pytest.raises(train.UserError, match="model.depth: checkpoint has 1, config has 2"):
    train.check_resume_config(str(tmp_path), tiny_config(**{"model.depth": 2}))


def test_workdir_alone_resumes_with_its_config_json(trained, tmp_path, monkeypatch, capsys):
  """dit-train --workdir=W --config.KEY=VALUE: config.json with the override; the change is
  checked (the model may not change), recorded in config_history.jsonl and announced."""
  from test_early_checks import run_command_here

  workdir = str(tmp_path / "run")
  shutil.copytree(trained.workdir, workdir)
  run = lambda *args: run_command_here(train, *args, monkeypatch=monkeypatch, capsys=capsys)
  code, _, err = run(f"--workdir={workdir}", "--config.model.depth=2")
  assert code == 2 and "Differing fields: model.depth: checkpoint has 1, config has 2" in err
  code, out, err = run(f"--workdir={workdir}", "--config.optim.lr=0.001", "--config.sample.num=0")
  assert code == 0, err
  assert "Resumed from step 4." in out  # total_steps is 4: nothing left to train.
  assert "optim.lr 0.002 -> 0.001; sample.num 20 -> 0" in out
  (row,) = checkpoint.read_config_history(workdir)
  assert row == dict(row, step=4, changes={"optim.lr": [0.002, 0.001], "sample.num": [20, 0]})
  assert checkpoint.read_config(workdir).optim.lr == 0.001  # config.json: the latest start.


def test_init_from_fine_tunes_from_the_params(trained, tmp_path, capsys):
  """--init_from: a new run whose step 0 holds the source's EMA params (lr 0 keeps them)."""
  config = tiny_config(
    **{"optim.schedule": "constant", "optim.lr": 0.0, "total_steps": 1, "ckpt_every": 1}
  )
  workdir = str(tmp_path / "tuned")
  state = jax.device_get(train.train_and_evaluate(config, workdir, init_from=trained.workdir))
  assert int(state["step"]) == 1
  tree_equal(state["params"], trained.state["ema_params"])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    state["ema_params"],
    trained.state["ema_params"],
  )
  (row,) = checkpoint.read_config_history(workdir)
  assert row["init_from"] == trained.workdir and row["step"] == 0
  assert f"Fine-tuning: step 0 holds the EMA params of {trained.workdir}" in capsys.readouterr().out
  # The same command again resumes the fine-tuning run; another run's workdir is refused.
  train.train_and_evaluate(config, workdir, init_from=trained.workdir)
  assert "Resumed from step 1." in capsys.readouterr().out
  with pytest.raises(train.UserError, match="--init_from starts a new run, but"):
    train.train_and_evaluate(config, workdir, init_from=os.path.join(trained.workdir, "ckpt"))
  # Params of other shapes: one line naming them, before anything is written.
  other = tiny_config(**{"model.hidden_size": 64})
  pattern = r"--init_from: .*blocks_0/attn/proj/kernel: checkpoint \(32, 32\), config \(64, 64\)"
  with pytest.raises(train.UserError, match=pattern):
    train.train_and_evaluate(other, str(tmp_path / "other"), init_from=f"{trained.workdir}/ckpt/2")
  assert not (tmp_path / "other").exists()


def test_corrupt_checkpoint_falls_back(trained, tmp_path, capsys):
  shutil.copytree(os.path.join(trained.workdir, "ckpt"), tmp_path / "ckpt")
  # A half-written save (killed before its rename) is not a checkpoint at all ...
  os.makedirs(tmp_path / "ckpt" / "6.orbax-checkpoint-tmp-1234" / "state")
  # ... and a damaged one is skipped for the previous one, with a warning.
  for root, _, files in os.walk(tmp_path / "ckpt" / "4" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  config = tiny_config(**RUN)
  mngr = checkpoint.manager(str(tmp_path), config)
  assert mngr.all_steps() == [2, 4]
  state, data = checkpoint.restore(mngr, abstract_state(config))
  assert int(state["step"]) == 2 and data["step"] == 2
  assert "checkpoint step 4" in capsys.readouterr().err
  # Nothing readable at all: a clear error rather than silently starting afresh.
  shutil.rmtree(tmp_path / "ckpt" / "2" / "state")
  mngr = checkpoint.manager(str(tmp_path), config)
  with pytest.raises(train.UserError, match="No checkpoint in .* is readable"):
    checkpoint.restore(mngr, abstract_state(config))


def test_nan_guard_stops_run(tmp_path, monkeypatch):
  """Non-finite steps are skipped and counted; k in a row stop the run, saving nothing."""
  make = pipeline.make_train_iterator

  class NanImages:
    def __init__(self, it):
      self.it = it

    def __next__(self):
      batch = next(self.it)
      return dict(batch, image=np.full_like(batch["image"], np.nan))

    def __getattr__(self, name):
      return getattr(self.it, name)

  monkeypatch.setattr(pipeline, "make_train_iterator", lambda *a, **k: NanImages(make(*a, **k)))
  config = tiny_config(**{"optim.schedule": "constant", "max_bad_steps": 3, "ckpt_every": 3})
  with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps up to step 3"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = read_metrics(tmp_path / "run")
  assert [r["skipped_steps"] for r in rows] == [1, 2, 3]
  assert os.listdir(tmp_path / "run" / "ckpt") == []


# One config for the jitted single-step tests, so that they share compiled programs.
STEP = {"optim.lr": 3e-3, "optim.schedule": "constant", "model.class_dropout_prob": 0.0}


def jit_update(config):
  model = dit_model.build_model(config.model)
  tx, lr = optim.make_optimizer(config)
  apply = train.make_apply(model, config.step_remat_policy)
  objective = objectives.make_objective(config, apply, schedules.make_schedule("linear", 1000))
  update = train.make_update_fn(config, objective.loss, tx, lr, None)
  state = jax.jit(lambda: train.init_state(config, model, tx))()
  return update, state


def digits_batch(n=8):
  rng = np.random.default_rng(0)
  size = tiny_config().model.input_size
  return {
    "image": jnp.asarray(rng.uniform(-1, 1, (n, size, size, 1)), jnp.float32),
    "label": jnp.arange(n, dtype=jnp.int32) % 10,
  }


@pytest.fixture(scope="module")
def plain_update():
  """The jitted one-device update step of the STEP config and its initial state."""
  update, state = jit_update(tiny_config(**STEP, **{"optim.ema_warmup": True}))
  return jax.jit(update), state


def test_nan_batch_skips_update(plain_update):
  update, state = plain_update
  batch = dict(digits_batch(), image=jnp.full_like(digits_batch()["image"], jnp.nan))
  new, metrics = update(state, batch)
  assert int(metrics["bad_steps"]) == 1 and int(metrics["skipped_steps"]) == 1
  assert int(new["step"]) == 1
  tree_equal(state["params"], new["params"])
  tree_equal(state["opt_state"], new["opt_state"])
  tree_equal(state["ema_params"], new["ema_params"])


def test_non_finite_update_of_finite_gradients_is_skipped():
  """The guard checks the optimizer's updates too, not only the loss and gradients."""
  config = tiny_config(**STEP)
  model = dit_model.build_model(config.model)
  tx = optax.adam(float("nan"))  # Finite gradients, NaN updates.
  apply = train.make_apply(model)
  objective = objectives.make_objective(config, apply, schedules.make_schedule("linear", 1000))
  update = jax.jit(
    train.make_update_fn(config, objective.loss, tx, optax.constant_schedule(0.0), None)
  )
  state = jax.jit(lambda: train.init_state(config, model, tx))()
  new, metrics = update(state, digits_batch())
  assert np.isfinite(float(metrics["grad_norm"])) and int(metrics["skipped_steps"]) == 1
  for key in ("params", "opt_state", "ema_params"):
    tree_equal(state[key], new[key])


@pytest.mark.parametrize("scan", [False, True])
def test_update_writes_the_donated_state_in_place(scan):
  """Temporaries of the compiled train step (params larger than the activations, batch 1):
  about the gradients alone (measured 1.43 unrolled, 1.70 scanned). The select of new against old
  state the NaN guard used before kept 4 param-sized copies (docs/performance.md)."""
  # Without clipping: optax's clip_by_global_norm divides every gradient by the norm, and
  # XLA materialises that quotient (one more param size).
  fields = {"model.hidden_size": 128, "model.depth": 2, "model.scan": scan, "optim.grad_clip": 0.0}
  config = tiny_config(**{**STEP, **fields, "parallelism": "mesh", "batch_size": 1})
  s = train.setup(config)
  size = config.model.input_size
  batch = {
    "image": jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32),
    "label": jax.ShapeDtypeStruct((1,), jnp.int32),
  }
  compiled = s.step.lower(s.abstract_state, batch, s.frozen).compile()
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.abstract_state["params"]))
  assert compiled.memory_analysis().temp_size_in_bytes < 2 * params


def test_loss_decreases_on_fixed_batch(plain_update):
  """Fitting one fixed batch drives the eps-MSE loss well below its starting value."""
  update, state = plain_update
  batch = digits_batch()
  losses = []
  for _ in range(150):
    # Same batch and the same noise each step: reset the step counter that seeds it.
    state = dict(state, step=jnp.zeros((), jnp.int32))
    state, metrics = update(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_grad_accumulation_and_ema(plain_update):
  """4 micro-batches (lax.scan) give the one-batch step's result; the first EMA update uses
  the warmed-up decay min(0.999, 1/10)."""
  plain, state = plain_update
  accum, _ = jit_update(tiny_config(**STEP, grad_accum_steps=4))
  batch = digits_batch()
  assert "scan" in str(jax.make_jaxpr(accum)(state, batch))
  p, pm = jax.device_get(plain(state, batch))
  a, am = jax.device_get(jax.jit(accum)(state, batch))
  np.testing.assert_allclose(am["loss"], pm["loss"], rtol=1e-6)
  np.testing.assert_allclose(am["grad_norm"], pm["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a["params"], p["params"])
  old = jax.device_get(state["ema_params"])
  expected = jax.tree.map(lambda e, q: 0.1 * e + 0.9 * q, old, p["params"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), p["ema_params"], expected)


def recording_update(config):
  """The jitted one-device update of `config` with the real objective, whose model appends
  the (x_t, t) it is called with to the returned list (on the host)."""
  model = dit_model.build_model(config.model)
  tx, lr = optim.make_optimizer(config)
  seen = []
  base = train.make_apply(model)

  def apply(params, x_t, t, cond):
    jax.debug.callback(lambda x, t: seen.append((np.asarray(x), np.asarray(t))), x_t, t)
    return base(params, x_t, t, cond)

  objective = objectives.make_objective(config, apply, schedules.from_config(config.diffusion))
  update = jax.jit(train.make_update_fn(config, objective.loss, tx, lr, None))
  return update, jax.jit(lambda: train.init_state(config, model, tx))(), seen


def test_every_step_draws_fresh_timesteps_and_noise():
  """The same params and batch at step 0 and at step 1 give different timesteps and losses
  (the per-example keys are folded with the step); the same step gives the same ones."""
  config = tiny_config(**STEP)
  update, state, seen = recording_update(config)
  batch = digits_batch()
  at = lambda step: update(dict(state, step=jnp.asarray(step, jnp.int32)), batch)[1]
  losses = [float(at(step)["loss"]) for step in (0, 1, 0)]
  jax.effects_barrier()
  (x0, t0), (x1, t1), (x0_again, t0_again) = seen
  assert np.sum(t0 != t1) >= 6, (t0, t1)  # 8 draws from U{0..999}: all but chance ties.
  np.testing.assert_array_equal(t0, t0_again)
  np.testing.assert_array_equal(x0, x0_again)
  # The noise, from x_t = alpha_t x0 + sigma_t eps: a fresh draw, not the same one rescaled.
  schedule = schedules.from_config(config.diffusion)
  alpha, sigma = (
    np.asarray(schedule.sqrt_alphas_cumprod),
    np.asarray(schedule.sqrt_one_minus_alphas_cumprod),
  )
  clean = np.asarray(batch["image"])
  eps = [
    (x - alpha[t][:, None, None, None] * clean) / sigma[t][:, None, None, None]
    for x, t in ((x0, t0), (x1, t1))
  ]
  correlation = np.corrcoef(eps[0].ravel(), eps[1].ravel())[0, 1]
  assert abs(correlation) < 0.2, correlation  # 512 independent normals: |r| ~ 0.04.
  assert losses[0] == losses[2] and abs(losses[0] - losses[1]) > 1e-3 * losses[0], losses


def test_example_keys_fold_the_step_then_the_example_index(plain_update):
  """batch["keys"][i] at step s is fold_in(fold_in(state rng, s), i), as documented
  (dit/objectives/base.py, docs/design.md): what the multi-device and resume checks rely on."""
  _, state = plain_update
  config = tiny_config(**STEP)
  tx, lr = optim.make_optimizer(config)
  probe = lambda params, batch, frozen: (jnp.zeros(()), {"keys": batch["keys"]})
  update = jax.jit(train.make_update_fn(config, probe, tx, lr, None))
  got = {}
  for step in (0, 1, 5):
    _, metrics = update(dict(state, step=jnp.asarray(step, jnp.int32)), digits_batch())
    got[step] = np.asarray(metrics["keys"])
    step_key = jax.random.fold_in(state["rng"], step)
    want = np.stack([np.asarray(jax.random.fold_in(step_key, i)) for i in range(8)])
    np.testing.assert_array_equal(got[step], want, err_msg=f"step {step}")
  assert not (got[0] == got[1]).all(axis=-1).any()  # Every example's key changes.
  assert len({k.tobytes() for k in got[0]}) == 8  # And every example has its own.


def test_remat_policy_wraps_forward():
  """config.step_remat_policy puts the forward under jax.checkpoint with that policy."""
  plain, state = jit_update(tiny_config(**STEP))
  remat, _ = jit_update(tiny_config(**STEP, step_remat_policy="dots_saveable"))
  batch = digits_batch()
  jaxpr = str(jax.make_jaxpr(remat)(state, batch))
  assert "remat" in jaxpr and "DotsSaveable" in jaxpr
  assert "remat" not in str(jax.make_jaxpr(plain)(state, batch))


def test_mixed_precision_keeps_float32_state():
  """bf16 compute: the matmuls run in bf16, params / optimizer state / EMA stay float32."""
  update16, state = jit_update(tiny_config(**STEP, **{"model.dtype": "bfloat16"}))
  batch = digits_batch()
  jaxpr = str(jax.make_jaxpr(update16)(state, batch))
  assert "bf16[" in jaxpr and "dot_general" in jaxpr
  new_state, metrics = jax.eval_shape(update16, state, batch)
  same = jax.tree.map(lambda n, o: (n.shape, n.dtype) == (o.shape, o.dtype), new_state, state)
  assert jax.tree.all(same)
  for leaf in jax.tree.leaves({k: new_state[k] for k in ("params", "ema_params", "opt_state")}):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  assert metrics["loss"].dtype == jnp.float32


def test_optimizer_schedule():
  config = tiny_config(
    **{"total_steps": 100, "optim.warmup_steps": 10, "optim.schedule": "cosine", "optim.lr": 1e-3}
  )
  _, lr = optim.make_optimizer(config)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)
  # DiT's recipe: constant lr, no warmup.
  _, lr = optim.make_optimizer(tiny_config(**{"optim.schedule": "constant", "optim.lr": 1e-4}))
  assert float(lr(0)) == float(lr(10**6)) == pytest.approx(1e-4)


@pytest.mark.parametrize(
  "overrides, num_dp, message",
  [
    ({"batch_size": 6}, 4, "batch_size=6 is not divisible by the data-parallel size (4 devices)"),
    ({"grad_accum_steps": 3}, 1, "x config.grad_accum_steps (3)"),
    ({"batch_size": 0}, 1, "config.batch_size must be positive, got 0"),
    ({"parallelism": "ddp"}, 1, "config.parallelism must be 'pmap' or 'mesh', got 'ddp'"),
    ({"step_remat_policy": "all"}, 1, "config.step_remat_policy must be '' or one of"),
    ({"eval.every": 5, "eval.metric": "is"}, 1, "config.eval.metric must be one of"),
  ],
)
def test_check_config(overrides, num_dp, message):
  with pytest.raises(train.UserError) as e:
    train.check_config(tiny_config(**overrides), num_dp)
  assert message in str(e.value)


def test_mesh_not_matching_devices(tmp_path):
  config = tiny_config(**{"parallelism": "mesh", "mesh.data": 2})
  with pytest.raises(train.UserError, match="needs 2 devices, but 1 are available"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(train.UserError, match="not writable"):
    checkpoint.prepare_workdir(str(blocker))


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.bogus=1"], "Unknown config key 'bogus'"),
    (["--config.model.depthh=2"], "Unknown config key 'model.depthh'"),
    (["--config.parallelism=mesh", "--config.mesh.data=3"], "needs 3 devices, but 1 are"),
    (["--workdir=/nonexistent/parent/run"], "parent of --workdir does not exist"),
  ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
  workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path}/r"]
  flags = [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-m", "dit.train", "--config=configs/digits.py", *flags, *workdir, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_metrics_jsonl_rewind(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
  train._rewind_jsonl(str(path), 2)
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_peak_flops_table():
  fake = lambda kind: types.SimpleNamespace(device_kind=kind)
  assert hardware.peak_tflops(fake("NVIDIA H100 80GB HBM3")) == 989.0
  assert hardware.peak_tflops(fake("NVIDIA H100 PCIe")) == 756.0
  assert hardware.peak_tflops(fake("NVIDIA L40S")) == 362.0
  assert hardware.peak_tflops(fake("TPU v5 lite")) == 197.0
  assert hardware.peak_tflops(fake("TPU v5")) == 459.0
  assert hardware.peak_tflops(fake("cpu")) is None


@pytest.mark.slow  # size_cond and the micro-conditioning layers have their own default tests.
def test_size_conditioning_model_trains(tmp_path):
  """A PixArt-alpha micro-conditioned model (what the PixArt converter produces) trains
  through the loop: every batch carries the trained image size."""
  config = tiny_config(**{"model.hidden_size": 48})  # Size embeddings need 3 | hidden_size.
  with config.unlocked():
    config.model.size_conditioning = True
  with contextlib.redirect_stdout(io.StringIO()):
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(jax.device_get(state["step"])) == 4
  assert "resolution_embedder" in state["params"]
  rows = read_metrics(tmp_path / "run")
  assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 0]
  # Step 1 is the objective on the first batch with resolution (8, 8) and aspect ratio 1.
  loss, grad_norm, init = first_step_reference(config)
  assert rows[0]["loss"] == pytest.approx(loss, rel=1e-5)
  assert rows[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
  # The size embedders get gradients once the zero-initialised final layer has moved.
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state["params"], init)
  assert min(jax.tree.leaves(moved["resolution_embedder"])) > 0
