"""experiments/sweep.py: grids, resuming a stopped sweep, --plot_only, the summary.

The sweep logic is tested with a stand-in trainer (FakeTrain: it writes config.json and
metrics.jsonl as dit.train does, counts its calls and fails where told), so the default run
stays fast; one slow test interrupts a real dit.train run between checkpoints.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_OVERRIDES

sys.path.insert(0, str(ROOT))

from dit import checkpoint, cli  # noqa: E402
from experiments import sweep  # noqa: E402

DIGITS = str(ROOT / "configs/digits.py")
LRS = [1e-4, 1e-3, 1e-2]


def fake_loss(config, step: int) -> float:
  """Lowest at lr 1e-3 at every width, lower for wider models, falling with steps."""
  return (math.log10(config.optim.lr) + 3) ** 2 + 32 / config.model.hidden_size + 1 / step


class FakeTrain:
  """Stands in for dit.train.train_and_evaluate: writes config.json, then one metrics row per
  step after the rows it finds (a resume); `fail` = {(call number, step): exception}."""

  def __init__(self, fail=None):
    self.calls, self.fail = [], fail or {}

  def __call__(self, config, workdir):
    os.makedirs(workdir, exist_ok=True)
    checkpoint.write_config(workdir, config)
    self.calls.append(os.path.basename(workdir))
    rows = sweep.read_metrics(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      for step in range((rows[-1]["step"] if rows else 0) + 1, config.total_steps + 1):
        error = self.fail.get((len(self.calls), step))
        if error is not None:
          raise error
        f.write(json.dumps({"step": step, "loss": fake_loss(config, step)}) + "\n")
        f.flush()


def _base(**overrides):
  return sweep.apply_overrides(cli.load_config(DIGITS), {"total_steps": 4, **overrides})


def _mtimes(root):
  return {
    os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
    for d, _, names in os.walk(root)
    for n in names
  }


def test_parse_grid_types_values_and_product_order():
  base = cli.load_config(DIGITS)
  grid = sweep.parse_grid(base, ["optim.lr=1e-4, 3e-4,1", "model.hidden_size=64,128"])
  assert grid == {"optim.lr": [1e-4, 3e-4, 1.0], "model.hidden_size": [64, 128]}
  assert all(isinstance(v, float) for v in grid["optim.lr"])  # Typed by the config.
  arms = sweep.grid_arms(grid)
  assert len(arms) == 6 and arms[0] == {"optim.lr": 1e-4, "model.hidden_size": 64}
  assert arms[1] == {"optim.lr": 1e-4, "model.hidden_size": 128}  # The first grid is slowest.
  assert sweep.grid_arms({}) == [{}]  # No grid: one run of the base.
  # A DiT field the config lacks takes its default's type; brackets and quotes keep commas.
  grid = sweep.parse_grid(base, ["model.size_conditioning=true,false"])
  assert grid == {"model.size_conditioning": [True, False]}
  assert sweep._split_values("(1, 2),[3,4],'a,b', x") == ["(1, 2)", "[3,4]", "'a,b'", "x"]


def test_joint_grid_axis_sets_its_keys_together():
  base = cli.load_config(DIGITS)
  items = ["model.hidden_size:model.num_heads=64:2,128:4", "optim.lr=1e-3,1e-2"]
  grid = sweep.parse_grid(base, items)
  assert grid == {
    "model.hidden_size:model.num_heads": [(64, 2), (128, 4)],
    "optim.lr": [1e-3, 1e-2],
  }
  arms = sweep.grid_arms(grid)
  assert arms == [
    {"model.hidden_size": 64, "model.num_heads": 2, "optim.lr": 1e-3},
    {"model.hidden_size": 64, "model.num_heads": 2, "optim.lr": 1e-2},
    {"model.hidden_size": 128, "model.num_heads": 4, "optim.lr": 1e-3},
    {"model.hidden_size": 128, "model.num_heads": 4, "optim.lr": 1e-2},
  ]
  assert sweep._grid_keys(grid) == ["model.hidden_size", "model.num_heads", "optim.lr"]


@pytest.mark.parametrize(
  "items, message",
  [
    (["optim.lr"], r"--grid='optim.lr' is not of the form key=v1,v2"),
    (["optim.lr="], "is not of the form key=v1,v2"),
    (["optim.lr=1,,2"], "has an empty value"),
    (["optim.lr=1", "optim.lr=2"], "gives 'optim.lr' twice"),
    (["optim.lr=1e-3,0.001"], "lists 0.001 twice"),
    (["optim.lrr=1"], r"Unknown config key 'optim.lrr': 'optim' has keys"),
    (["model.depth=2,two"], "'model.depth' takes a value of type int"),
    (["model.hidden_size:model.num_heads=64:2,128"], "value '128' has 1 parts, expected 2"),
    (["model.depth=2", "model.depth:seed=3:1"], "gives 'model.depth:seed' twice"),
    (["model.depth:seed=2:1,2:1"], r"lists \(2, 1\) twice"),
  ],
)
def test_parse_grid_errors(items, message):
  with pytest.raises(cli.UserError, match=message):
    sweep.parse_grid(cli.load_config(DIGITS), items)


def test_stopped_sweep_reruns_only_missing_runs(tmp_path):
  base, root = _base(), str(tmp_path / "runs")
  arms = sweep.grid_arms({"optim.lr": LRS})
  names = [os.path.basename(sweep.arm_workdir(base, a, root)) for a in arms]
  # The second run fails at its step 3, after 2 steps: the sweep stops there.
  first = FakeTrain(fail={(2, 3): RuntimeError("injected failure")})
  with pytest.raises(RuntimeError, match="injected failure"):
    sweep.run_sweep(base, arms, root, train_fn=first)
  assert first.calls == names[:2]
  statuses = [sweep.run_status(os.path.join(root, n)) for n in names]
  assert statuses == ["finished", "partial", "missing"]
  done = _mtimes(os.path.join(root, names[0]))

  again = FakeTrain()
  records = sweep.run_sweep(base, arms, root, train_fn=again)
  assert again.calls == names[1:]  # The finished run is not trained again.
  assert _mtimes(os.path.join(root, names[0])) == done
  assert [r["status"] for r in records] == ["finished"] * 3
  assert [r["steps"] for r in records] == [4, 4, 4]
  resumed = sweep.read_metrics(os.path.join(root, names[1]))
  assert [r["step"] for r in resumed] == [1, 2, 3, 4]
  result = json.loads((tmp_path / "runs" / names[1] / sweep.RESULT).read_text())
  assert result["status"] == "finished" and result["total_steps"] == 4
  assert result["final_loss"] == pytest.approx(fake_loss(sweep.apply_overrides(base, arms[1]), 4))

  # Nothing left: no calls. Without its result file a run counts as unfinished again.
  third = FakeTrain()
  assert sweep.run_sweep(base, arms, root, train_fn=third) == records and third.calls == []
  os.remove(os.path.join(root, names[2], sweep.RESULT))
  sweep.run_sweep(base, arms, root, train_fn=third)
  assert third.calls == names[2:]


def test_diverged_run_is_final_and_not_an_optimum(tmp_path):
  base, root = _base(), str(tmp_path)
  arms = sweep.grid_arms({"optim.lr": LRS})
  train = FakeTrain(fail={(3, 2): FloatingPointError("20 consecutive non-finite steps")})
  records = sweep.run_sweep(base, arms, root, train_fn=train)
  assert [r["status"] for r in records] == ["finished", "finished", "diverged"]
  assert records[2]["final_loss"] is None and records[2]["steps"] == 1
  result = sweep.read_result(records[2]["workdir"])
  assert result["status"] == "diverged" and "non-finite" in result["error"]
  again = FakeTrain()
  sweep.run_sweep(base, arms, root, train_fn=again)
  assert again.calls == []  # It would diverge again.
  summary = sweep.summarise(records, x="optim.lr")
  assert summary["counts"] == {"finished": 2, "diverged": 1, "partial": 0, "missing": 0}
  (best,) = summary["optima"]["final_loss"]
  assert best["optim.lr"] == 1e-3 and best["of"] == 2 and best["group"] == {}


def test_run_of_another_config_is_an_error(tmp_path):
  arms = [{"optim.lr": 1e-3}]
  sweep.run_sweep(_base(), arms, str(tmp_path), train_fn=FakeTrain())
  with pytest.raises(cli.UserError, match=r"holds a run of another config \(optim.b1 0.9 -> 0.8"):
    sweep.run_sweep(_base(**{"optim.b1": 0.8}), arms, str(tmp_path), train_fn=FakeTrain())
  # Logging, checkpointing and sampling keys are not training: the run stays finished.
  train = FakeTrain()
  same = _base(log_every=7, ckpt_every=3, **{"sample.steps": 3})
  assert sweep.run_sweep(same, arms, str(tmp_path), train_fn=train)[0]["status"] == "finished"
  assert train.calls == []
  with pytest.raises(ValueError, match="map to one workdir"):
    sweep.run_sweep(_base(), [{"data.num_classes": 5}, {"model.num_classes": 5}], str(tmp_path))


def _run_sweep_command(*args):
  cmd = [sys.executable, "-m", "experiments.sweep", f"--config={DIGITS}", *args]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_plot_only_command_summarises_without_training(tmp_path):
  base, root = _base(), str(tmp_path / "runs")
  grid = {"optim.lr": [1e-4, 1e-3], "model.hidden_size": [32, 64]}
  arms = sweep.grid_arms(grid)
  sweep.run_sweep(base, arms[:3], root, train_fn=FakeTrain())  # The 4th run is missing.
  before = _mtimes(root)
  result = _run_sweep_command(
    f"--workdir={root}",
    "--grid=optim.lr=1e-4,1e-3",
    "--grid=model.hidden_size=32,64",
    "--config.total_steps=4",
    "--plot_only",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "runs" / "sweep.json").read_text())
  assert (tmp_path / "runs" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
  after = _mtimes(root)
  assert {k: after[k] for k in before} == before  # The runs are untouched ...
  assert sorted(set(after) - set(before)) == [f"{root}/sweep.json", f"{root}/sweep.png"]
  assert summary["grid"] == grid and summary["overrides"] == {"total_steps": 4}
  assert summary["x"] == "optim.lr" and summary["config"] == DIGITS
  assert [r["status"] for r in summary["runs"]] == ["finished"] * 3 + ["missing"]
  assert summary["counts"]["missing"] == 1
  best = {b["group"]["model.hidden_size"]: b for b in summary["optima"]["final_loss"]}
  assert best[32]["optim.lr"] == 1e-3 and best[32]["of"] == 2
  assert best[64]["optim.lr"] == 1e-4 and best[64]["of"] == 1
  # ... and the same summary comes from the library.
  records = sweep.run_sweep(base, arms, root, train=False)
  assert json.loads(json.dumps(records)) == summary["runs"]


@pytest.mark.parametrize(
  "args, message",
  [
    (["--grid=optim.lr"], "error: --grid='optim.lr' is not of the form key=v1,v2"),
    (["--grid=optim.lr=1", "--x=model.depth"], "error: --x='model.depth' is not a --grid key"),
  ],
)
def test_sweep_command_errors_are_one_line(tmp_path, args, message):
  result = _run_sweep_command(f"--workdir={tmp_path}", "--plot_only", *args)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_plot_summary_with_diverged_runs_and_no_x(tmp_path):
  runs = [
    {"overrides": {"optim.lr": lr}, "workdir": "", "status": s, "steps": 4, "final_loss": loss}
    for lr, s, loss in [(1e-4, "finished", 2.0), (1e-3, "finished", 1.0), (1e-1, "diverged", None)]
  ]
  for x in ("optim.lr", None):
    sweep.write_summary(sweep.summarise(runs, x=x), str(tmp_path / "s"))
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # Four real tiny training runs (a few minutes on 2 busy cores).
def test_real_sweep_resumes_a_run_from_its_checkpoint(tmp_path, monkeypatch, capsys):
  """dit.train killed between checkpoints (a failure injected after step 2's save): the rerun
  trains only the two unfinished runs, and the interrupted one resumes from step 2."""
  from dit import train

  tiny = {**TINY_OVERRIDES, "model.patch_size": 4, "total_steps": 4, "ckpt_every": 2}
  base = sweep.apply_overrides(cli.load_config(DIGITS), tiny)
  arms, root = sweep.grid_arms({"seed": [0, 1, 2]}), str(tmp_path)
  names = [os.path.basename(sweep.arm_workdir(base, a, root)) for a in arms]
  calls = []

  def counted(config, workdir):
    calls.append(os.path.basename(workdir))
    return train.train_and_evaluate(config, workdir)

  save = checkpoint.save

  def failing_save(mngr, state, *args, **kwargs):
    save(mngr, state, *args, **kwargs)
    if len(calls) == 2 and int(state["step"]) == 2:
      raise RuntimeError("injected failure")

  monkeypatch.setattr(checkpoint, "save", failing_save)
  with pytest.raises(RuntimeError, match="injected failure"):
    sweep.run_sweep(base, arms, root, train_fn=counted)
  monkeypatch.setattr(checkpoint, "save", save)
  assert calls == names[:2]
  assert [sweep.run_status(os.path.join(root, n)) for n in names] == [
    "finished",
    "partial",
    "missing",
  ]
  done = _mtimes(os.path.join(root, names[0]))
  capsys.readouterr()
  records = sweep.run_sweep(base, arms, root, train_fn=counted)
  assert calls == names[:2] + names[1:]
  assert "Resumed from step 2." in capsys.readouterr().out
  assert _mtimes(os.path.join(root, names[0])) == done
  assert [r["status"] for r in records] == ["finished"] * 3 and all(
    r["steps"] == 4 for r in records
  )
  assert [r["step"] for r in sweep.read_metrics(os.path.join(root, names[1]))] == [1, 2, 3, 4]
