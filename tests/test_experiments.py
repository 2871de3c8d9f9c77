"""experiments/: override handling, the power-law and isoFLOP fits (on synthetic data with a
known exponent), a 2-point scaling study and a 2-arm ablation run end to end on tiny digits
settings, an isoFLOP study through the sweep with a stand-in trainer (the files they write are
checked). The sweep's own resume and --plot_only are in test_sweep.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES

sys.path.insert(0, str(ROOT))

from dit import cli  # noqa: E402
from experiments import ablations, distill_digits, lr_transfer, repa_digits, scaling, sweep  # noqa: E402

DIGITS = str(ROOT / "configs/digits.py")
# Tiny runs: 8x8 digits, patch 4 (4 tokens), a few steps, a few samples in 2 DDIM steps.
TINY = {
  **TINY_OVERRIDES,
  "total_steps": 3,
  "ckpt_every": 3,
  "model.patch_size": 4,
  "sample.steps": 2,
  "eval.num_samples": 10,
  "eval.batch_size": 10,
}


def test_apply_overrides_sets_adds_model_fields_and_rejects_unknown_keys():
  base = cli.load_config(DIGITS)
  config = sweep.apply_overrides(base, {"model.depth": 2, "model.size_conditioning": True})
  assert config.model.depth == 2 and config.model.size_conditioning is True
  assert config.is_locked
  assert base.model.depth == 4 and "size_conditioning" not in base.model  # Unchanged.
  assert sweep.get(base, "model.size_conditioning") is False  # DiT's default.
  with pytest.raises(
    cli.UserError, match=r"'model.depthh': 'model' has keys \[.*'size_conditioning'"
  ):
    sweep.apply_overrides(base, {"model.depthh": 2})
  with pytest.raises(cli.UserError, match="optimm"):
    sweep.apply_overrides(base, {"optimm.lr": 1.0})
  with pytest.raises(cli.UserError, match="'model.size_conditioning' takes a value of type bool"):
    sweep.apply_overrides(base, {"model.size_conditioning": "yes"})


def test_cli_apply_overrides_parses_and_checks_values():
  base = cli.load_config(DIGITS)
  items = ["model.depth=2", "optim.lr=1", "model.remat=true", "sample.cfg_scale=1.5e0",
           "data.name=tfds:mnist", "model.dtype='bfloat16'", "model.block=1"]  # fmt: skip
  config = cli.apply_overrides(base, items)
  assert (config.model.depth, config.optim.lr, config.model.remat) == (2, 1.0, True)
  assert isinstance(config.optim.lr, float) and config.sample.cfg_scale == 1.5
  assert (config.data.name, config.model.dtype) == ("tfds:mnist", "bfloat16")
  assert config.model.block == "1"  # A str key takes the text as it is.
  assert config.is_locked and base.model.depth == 4
  # A list and a dict give the same config; a later item wins.
  same = cli.apply_overrides(base, {"model.depth": 3, "optim.lr": 1e-3})
  assert cli.apply_overrides(base, ["model.depth=2", "model.depth=3", "optim.lr=1e-3"]) == same
  # Unset (None) keys take any literal; tuples and lists convert to the key's type.
  with base.unlocked():
    base.model.extra, base.model.sizes = None, (1, 2)
  config = cli.apply_overrides(base, ["model.extra=(1, 'a')", "model.sizes=[3, 4]"])
  assert config.model.extra == (1, "a") and config.model.sizes == (3, 4)
  assert cli.apply_overrides(base, ["model.extra=None"]).model.extra is None
  assert cli.apply_overrides(base, ["model.extra=some/path"]).model.extra == "some/path"
  # With defaults, a missing key is added, typed by its default.
  config = cli.apply_overrides(
    base, ["model.size_conditioning=True"], defaults=sweep.MODEL_DEFAULTS
  )
  assert config.model.size_conditioning is True


@pytest.mark.parametrize(
  "item, message",
  [
    ("model.depth", "'model.depth' is not of the form key=value"),
    ("=3", "not of the form key=value"),
    ("model.depthh=2", r"Unknown config key 'model.depthh': 'model' has keys \['block'"),
    ("optimm.lr=1", r"Unknown config key 'optimm.lr': 'config' has keys \['batch_size'"),
    ("seed.x=1", "'seed' is a value, not a section"),
    ("model=1", "'model' is a section, not a value"),
    ("model.depth=2.5", r"'model.depth' takes a value of type int \(its value is 4\), got 2.5"),
    ("model.depth=True", "'model.depth' takes a value of type int"),
    ("model.depth=four", "'model.depth' takes a value of type int .*got 'four'"),
    ("model.remat=1", "'model.remat' takes a value of type bool"),
    ("optim.lr=fast", "'optim.lr' takes a value of type float"),
  ],
)
def test_cli_apply_overrides_errors(item, message):
  with pytest.raises(cli.UserError, match=message):
    cli.apply_overrides(cli.load_config(DIGITS), [item])


def test_load_config_errors_are_one_line_user_errors(tmp_path):
  files = {
    "syntax.py": "def get_config(:\n  pass\n",
    "raises.py": "import no_such_module_here\n",
    "empty.py": "X = 1\n",
    "no_arg.py": "def get_config():\n  return None\n",
    "bad_arg.py": "def get_config(arg):\n  return {'a': 1}[arg]\n",
  }
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  cases = [
    (tmp_path / "missing.py", "Config file '.*missing.py' does not exist"),
    (tmp_path, "is a directory, not a file"),
    (tmp_path / "syntax.py", "Config file '.*syntax.py': syntax error at line 1"),
    (tmp_path / "raises.py", "raises.py' failed to load: ModuleNotFoundError: No module named"),
    (tmp_path / "empty.py", "empty.py' defines no get_config"),
    (f"{tmp_path / 'bad_arg.py'}:b", "Config '.*bad_arg.py:b': KeyError: 'b'"),
    (f"{tmp_path / 'no_arg.py'}:x", "Config '.*no_arg.py:x': .*get_config"),  # Takes none.
  ]
  for spec, message in cases:
    with pytest.raises(cli.UserError, match=message) as e:
      cli.load_config(str(spec))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "args, message",
  [
    (["--set=model.depthh=1"], "error: Unknown config key 'model.depthh': 'model' has keys"),
    (["--set=model.depth=two"], "error: Config key 'model.depth' takes a value of type int"),
    (["--base=configs/nope.py"], "error: Config file 'configs/nope.py' does not exist."),
  ],
)
def test_scaling_command_line_errors_are_one_line(tmp_path, args, message):
  out = ["--plot_only", f"--workdir={tmp_path}", f"--out={tmp_path}/s"]
  cmd = [sys.executable, "-m", "experiments.scaling", *out, *args]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_train_overrides_and_slug():
  base = cli.load_config(DIGITS)
  arm = {"model.size_conditioning": False, "sample.steps": 5, "diffusion.prediction": "v"}
  assert sweep.train_overrides(base, arm) == {"diffusion.prediction": "v"}
  assert sweep.slug({}) == "base"
  assert sweep.slug({"diffusion.prediction": "v"}) == "prediction=v"
  long = {f"model.k{i}": "x" * 20 for i in range(10)}
  assert len(sweep.slug(long)) <= 80 and sweep.slug(long) != sweep.slug({**long, "a.b": 1})


def test_final_loss_and_metrics_resume(tmp_path):
  rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 11)]
  # A resumed run appends steps 9-10 again: the last row of a step wins.
  lines = [*rows, {"step": 9, "loss": 0.5}, {"step": 10, "loss": 0.25}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
  read = sweep.read_metrics(str(tmp_path))
  assert [r["step"] for r in read] == list(range(1, 11))
  assert sweep.final_loss(read, fraction=0.1) == pytest.approx((0.5 + 0.25) / 2)


def test_power_law_fit_recovers_exponent():
  c = np.geomspace(1e3, 1e7, 6)
  fit = scaling.power_law_fit(c, 3.0 * c**-0.2)
  assert fit["a"] == pytest.approx(3.0, rel=1e-9)
  assert fit["b"] == pytest.approx(-0.2, rel=1e-9)
  assert fit["r2"] == pytest.approx(1.0) and fit["n"] == 6
  assert fit["b_ci"] == pytest.approx([-0.2, -0.2], abs=1e-9)  # No noise: no width.
  assert scaling.power_law_fit([1.0], [2.0]) is None
  assert scaling.power_law_fit([1.0, 1.0], [2.0, 3.0]) is None  # One compute value.
  two = scaling.power_law_fit([1.0, 10.0], [2.0, 1.0])
  assert two["b"] == pytest.approx(-np.log10(2)) and two["b_ci"] is None  # No residual dof.


def test_power_law_fit_interval_holds_the_true_exponent_and_not_a_wrong_one():
  c = np.geomspace(1e2, 1e6, 12)
  rng = np.random.default_rng(0)
  noisy = lambda: 2.0 * c**-0.15 * np.exp(rng.normal(0.0, 0.03, c.shape))  # 3% noise.
  fit = scaling.power_law_fit(c, noisy())
  lo, hi = fit["b_ci"]
  assert lo < -0.15 < hi and fit["a_ci"][0] < 2.0 < fit["a_ci"][1]
  assert not lo < -0.18 < hi and not lo < -0.12 < hi  # A wrong exponent is outside.
  assert fit["level"] == 0.95 and 0 < hi - lo < 0.02
  # A 95% interval: it holds the truth in about 95% of noisy draws of 4 points (a too narrow
  # or too wide one, e.g. with a normal quantile or the residual variance over n, would not).
  c = np.geomspace(1e2, 1e6, 4)  # `noisy` draws at these now.
  hits = [np.clip(-0.15, *scaling.power_law_fit(c, noisy())["b_ci"]) == -0.15 for _ in range(2000)]
  assert 0.935 < np.mean(hits) < 0.965


def _chinchilla_runs(sizes_around=(0.15, 0.4, 1.0, 2.5, 7.0), budgets=(1e18, 1e19, 1e20, 1e21)):
  """Runs whose final loss follows Chinchilla's fit L = E + A/N^a + B/D^b, C = 6 N D: the
  compute-optimal size is N_opt = G (C/6)^(b/(a+b)) exactly."""
  E, A, a, B, b = 1.69, 406.4, 0.34, 410.7, 0.28
  G = (a * A / (b * B)) ** (1 / (a + b))
  runs = []
  for c in budgets:
    n_opt = G * (c / 6) ** (b / (a + b))
    for f in sizes_around:  # Not symmetric about the optimum: the parabola is not exact.
      n = n_opt * f
      loss = E + A / n**a + B / (c / (6 * n)) ** b
      run = dict(label=f"{f}", family="p2", status="finished", budget_gflops=c, params=n)
      runs.append(dict(run, train_gflops=c, final_loss=loss, eval={"digits_fd": 10 * loss}))
  return runs, b / (a + b)


def test_isoflop_optimum_and_compute_optimal_exponent():
  runs, exponent = _chinchilla_runs()
  result = scaling.analyse(runs, "digits_fd")
  curves = result["isoflops"]
  assert len(curves) == 4 and all(c["interior"] for c in curves)
  for c in curves:
    truth = next(
      r["params"] for r in runs if r["budget_gflops"] == c["budget_gflops"] and r["label"] == "1.0"
    )
    assert c["opt_params"] == pytest.approx(truth, rel=0.15)
    assert c["opt_value"] <= min(c["values"]) + 1e-3
  fit = result["optimal_size"]["p2"]["fit"]
  assert fit["b"] == pytest.approx(exponent, abs=0.01) and fit["n"] == 4
  # The frontier: the best loss per budget, falling with compute; the eval metric's too.
  assert result["frontier"]["final_loss"] == [
    [c["budget_gflops"], min(c["values"])] for c in curves
  ]
  assert [c for c, _ in result["frontier"]["final_loss"]] == [1e18, 1e19, 1e20, 1e21]
  assert result["fit_loss"]["b"] < 0 and result["fit_eval"]["b"] == pytest.approx(
    result["fit_loss"]["b"]
  )
  # Sizes all on one side of the optimum: the best run, flagged at the edge, and not fitted.
  edge = scaling.analyse(_chinchilla_runs(sizes_around=(2.0, 4.0, 8.0))[0], "digits_fd")
  assert not any(c["interior"] for c in edge["isoflops"])
  assert all(c["opt_params"] == min(c["params"]) for c in edge["isoflops"])
  assert (
    edge["optimal_size"]["p2"]["fit"] is None and len(edge["optimal_size"]["p2"]["at_edge"]) == 4
  )
  # The smallest size best and the losses rising steeply (digits' smallest budget): the
  # parabola's vertex falls inside the sizes, but the optimum is still at the edge.
  steep = [
    dict(label=str(i), family="p4", status="finished", budget_gflops=300.0, params=n,
         train_gflops=300.0, final_loss=loss, eval={})
    for i, (n, loss) in enumerate(
      zip([1.8e5, 6.8e5, 2.0e6, 3.5e6], [0.033, 0.0475, 0.0926, 0.3944], strict=True)
    )
  ]  # fmt: skip
  (curve,) = scaling.isoflop_curves(steep)
  c2, c1, _ = curve["parabola"]
  assert c2 > 0 and np.log(1.8e5) < -c1 / (2 * c2) < np.log(3.5e6)  # The vertex is inside.
  assert not curve["interior"] and curve["opt_params"] == 1.8e5


def test_scaled_presets():
  paper = scaling.paper_presets()
  assert paper["XL"] == (1152, 28, 16)
  for size in scaling.SIZES:
    assert scaling.scaled_preset(size, 1) == paper[size]
    hidden, depth, heads = scaling.scaled_preset(size, 6)
    assert hidden % heads == 0 and hidden % 32 == 0 and depth >= 1
  # Ordered like the paper's: wider (and not shallower) from S to XL.
  widths = [scaling.scaled_preset(s, 6)[0] for s in scaling.SIZES]
  assert widths == sorted(widths) and len(set(widths)) == 4
  spec = scaling.sweep_spec(["S", "B"], [4, 2], 6)
  assert len(spec) == 4 and spec[0]["model.patch_size"] == 4
  assert scaling.run_label(spec[3], 6) == "B/2"
  with pytest.raises(ValueError, match="Unknown model size 'XXL'"):
    scaling.scaled_preset("XXL", 6)


def _is_png(path):
  return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # Over 20 s on 2 cores; the fast tests cover the parts.
def test_two_point_sweep_end_to_end(tmp_path):
  spec = [
    {"model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "model.patch_size": 4},
    {"model.hidden_size": 64, "model.depth": 1, "model.num_heads": 2, "model.patch_size": 4},
  ]
  out = tmp_path / "out" / "scaling"
  results = scaling.run_study(spec, str(tmp_path / "runs"), str(out), base_spec=DIGITS, common=TINY)
  saved = json.loads((tmp_path / "out" / "scaling.json").read_text())
  assert _is_png(tmp_path / "out" / "scaling.png")
  assert len(saved["runs"]) == 2 and all(r["finished"] for r in saved["runs"])
  small, big = saved["runs"]
  assert small["params"] < big["params"]
  for r in saved["runs"]:
    # Training compute = the per-image train FLOPs x batch x steps.
    assert r["train_gflops"] == pytest.approx(r["gflops_train_per_image"] * 8 * 3)
    assert r["steps"] == 3 and np.isfinite(r["final_loss"])
    assert 0.0 <= r["eval"]["accuracy"] <= 1.0 and r["eval"]["digits_fd"] > 0
    assert r["curve"][-1][0] == pytest.approx(r["train_gflops"])
    assert (Path(r["workdir"]) / "result.json").exists()
  assert saved["fit_loss"]["r2"] == pytest.approx(1.0)  # Two points fit exactly.
  assert saved["fit_eval"] is not None and saved["isoflops"] == []
  # Re-plotting from the run directories alone gives the same table (and trains nothing).
  again = scaling.run_study(
    spec, str(tmp_path / "runs"), str(out), base_spec=DIGITS, common=TINY, train=False
  )
  assert again["runs"] == results["runs"]


def _fake_train(config, workdir):
  """A stand-in for dit.train: loss rows of L = 1 + (N0/N)^0.5 + (D0/D)^0.5 (N params, D
  images seen), so that the isoFLOP optimum lies inside the sizes of the test below."""
  from dit import checkpoint

  os.makedirs(workdir, exist_ok=True)
  checkpoint.write_config(workdir, config)
  n = scaling.train_gflops(config)["params"]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in range(1, config.total_steps + 1):
      loss = 1 + (1e5 / n) ** 0.5 + (1750 / (step * config.batch_size)) ** 0.5
      f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def test_isoflop_study_through_the_sweep(tmp_path):
  models = [
    {"model.hidden_size": h, "model.depth": 1, "model.num_heads": 2, "model.patch_size": 4}
    for h in (32, 64, 128, 256)
  ]
  budgets = [5.0, 10.0, 20.0]
  kwargs = dict(base_spec=DIGITS, common=TINY, budgets=budgets, evaluate=False)
  root, out = str(tmp_path / "runs"), str(tmp_path / "study")
  results = scaling.run_study(models, root, out, train_fn=_fake_train, **kwargs)
  runs = results["runs"]
  assert len(runs) == 12 and all(r["finished"] for r in runs)
  for r in runs:  # Each run's steps spend its budget: compute within half a step of it.
    per_step = r["gflops_train_per_image"] * 8
    assert abs(r["train_gflops"] - r["budget_gflops"]) <= per_step / 2
    assert r["overrides"]["total_steps"] == r["steps"]
  assert len(os.listdir(root)) == 12  # One workdir per (model, budget).
  curves = results["isoflops"]
  assert [c["budget_gflops"] for c in curves] == budgets and all(c["interior"] for c in curves)
  opt = results["optimal_size"]["p4"]
  assert opt["compute"] == budgets and opt["params"] == sorted(opt["params"])
  assert 0.3 < opt["fit"]["b"] < 0.7  # N_opt ~ C^0.5 for equal exponents.
  assert results["fit_loss"]["b"] < 0 and results["fit_loss"]["b_ci"] is not None
  assert _is_png(tmp_path / "study.png")
  # --plot_only: the same JSON from the run directories, and the figure from that JSON.
  saved = (tmp_path / "study.json").read_text()
  (tmp_path / "study.png").unlink()
  scaling.run_study(models, root, out, train=False, train_fn=_fake_train, **kwargs)
  assert (tmp_path / "study.json").read_text() == saved and _is_png(tmp_path / "study.png")
  scaling.plot_study(str(tmp_path / "study.json"), str(tmp_path / "again.png"))
  assert _is_png(tmp_path / "again.png")
  with pytest.raises(cli.UserError, match="Budget 1e-06 GFLOPs is less than one step"):
    scaling.run_study(models, root, out, **{**kwargs, "budgets": [1e-6]})


def test_shared_plot_helpers(tmp_path):
  """ablations' and flow_vs_eps' curves through experiments/plots.py."""
  from experiments import flow_vs_eps, plots

  records = [
    {"overrides": {"sample.sampler": s, "sample.steps": n}, "digits_fd": 10 / n, "accuracy": 0.9}
    for s in ("ddim", "euler")
    for n in (10, 5)
  ]
  ablations.plot_sampler_nfe(records, str(tmp_path / "a.png"))
  flow = [
    dict(model=m, sampler="euler", nfe=n, digits_fd=5.0 / n, accuracy=0.95)
    for m in flow_vs_eps.MODELS
    for n in (8, 4)
  ]
  flow_vs_eps.plot(flow, str(tmp_path / "f.png"))
  assert _is_png(tmp_path / "a.png") and _is_png(tmp_path / "f.png")
  fig, ax = plots.pyplot().subplots()
  steps = lambda r: r["overrides"]["sample.steps"]
  sampler = lambda r: r["overrides"]["sample.sampler"]
  no_y = {"overrides": {"sample.sampler": "x", "sample.steps": 1}}
  labels = plots.lines(ax, [*records, no_y], steps, "digits_fd", by=sampler)
  assert labels == ["ddim", "euler"]  # A record without the y key is left out.
  assert [list(line.get_xdata()) for line in ax.lines] == [[5, 10], [5, 10]]  # Sorted by x.
  plots.save(fig, str(tmp_path / "p.png"))


@pytest.mark.slow  # The sweep path is covered by test_two_point_sweep_end_to_end.
def test_two_arm_ablation_end_to_end(tmp_path):
  arms = {
    "conditioning": [{"model.block": "adaln_zero"}, {"model.block": "in_context"}],
    # Sampling-only arm: reuses the adaln_zero model, no third training run.
    "sampler_nfe": [{"sample.sampler": "euler", "sample.steps": 2}],
  }
  out = tmp_path / "docs" / "ablations"
  runs = tmp_path / "runs"
  results = ablations.run_ablations(
    list(arms), str(runs), str(out), base_spec=DIGITS, common=TINY, ablations=arms
  )
  assert sorted(p.name for p in runs.iterdir()) == ["base", "block=in_context"]
  saved = json.loads((tmp_path / "docs" / "ablations.json").read_text())
  assert saved == json.loads(json.dumps(results))
  cond = saved["ablations"]["conditioning"]
  assert [r["arm"] for r in cond] == ["block=adaln_zero", "block=in_context"]
  assert all(r["steps"] == 3 for r in cond)  # Equal steps.
  for r in cond:
    assert {"final_loss", "eps_mse", "accuracy", "digits_fd"} <= set(r)
  table = (tmp_path / "docs" / "ablations.md").read_text()
  assert "### conditioning" in table and "| block=in_context | 3 |" in table
  assert _is_png(tmp_path / "docs" / "ablations_conditioning.png")
  assert _is_png(tmp_path / "docs" / "ablations_sampler_nfe.png")
  with pytest.raises(ValueError, match="Unknown ablations"):
    ablations.run_ablations(["nope"], str(runs), str(out), ablations=arms)


def test_distill_digits_report(tmp_path):
  """experiments/distill_digits.py: the edge-noise measure and the files it writes."""
  assert distill_digits.real_edge_noise() < 0.1  # Real digits: blank edges.
  noisy = np.random.default_rng(0).uniform(-1, 1, (50, 8, 8, 1))
  assert distill_digits.edge_noise(noisy) > 0.5
  rows = [
    dict(model=m, sampler=s, steps=n, cfg_scale=4.0, accuracy=1.0, digits_fd=30.0, edge_noise=0.2)
    for m, s, n in distill_digits.ARMS
  ]
  for r in rows:
    r["ms_per_image"] = 1.5
  distill_digits.write_markdown(rows, str(tmp_path / "d.md"), 1000)
  table = (tmp_path / "d.md").read_text()
  assert "| student | lcm | 1 | 1.000 | 30.0 | 0.200 | 1.50 |" in table
  grids = {arm: np.zeros((100, 8, 8, 1)) for arm in distill_digits.GRID_ARMS}
  distill_digits.write_figure(grids, str(tmp_path / "d.png"))
  assert (tmp_path / "d.png").stat().st_size > 1000


def test_repa_digits_speedup_reads_the_plain_curve(tmp_path):
  steps = [250, 500, 1000, 2000]
  assert repa_digits.steps_to_reach(steps, [8.0, 4.0, 2.0, 1.0], 4.0) == 500
  # Half way down from 4 to 2 in FD is half way from 500 to 1000 in log steps.
  np.testing.assert_allclose(
    repa_digits.steps_to_reach(steps, [8.0, 4.0, 2.0, 1.0], 3.0), np.sqrt(500 * 1000)
  )
  assert repa_digits.steps_to_reach(steps, [8.0, 4.0, 2.0, 1.0], 0.5) is None
  acc = [0.1, 0.5, 0.9, 1.0]
  np.testing.assert_allclose(
    repa_digits.steps_to_reach(steps, acc, 0.7, higher=True), np.sqrt(500 * 1000)
  )

  def record(arm, seed, fd, acc):
    c = {"step": steps, "digits_fd": fd, "accuracy": acc, "repa_align": [None] * 4}
    return {"arm": arm, "seed": seed, "status": "finished", "curve": c}

  records = [
    record("no REPA", 0, [8.0, 4.0, 2.0, 1.0], [0.1, 0.5, 0.9, 1.0]),
    record("no REPA", 1, [8.0, 4.0, 2.0, 1.0], [0.1, 0.5, 0.9, 1.0]),
    record("REPA", 0, [4.0, 2.0, 1.0, 0.6], [0.5, 0.9, 1.0, 1.0]),
    record("REPA", 1, [4.0, 2.0, 1.0, 0.4], [0.5, 0.9, 1.0, 1.0]),
  ]
  summary = repa_digits.summarise(records)
  # REPA at 250 steps (FD 4) is the plain run at 500: 2x; at 1000 (FD 1): the plain run's
  # 2000, 2x; at 2000 (FD 0.5, the seed mean) better than the plain run ever got.
  assert summary["speedup"]["digits_fd"] == {"250": 2.0, "500": 2.0, "1000": 2.0, "2000": "> 1"}
  # Accuracy: 2x at 250 and 500, the plain run reaches 1.0 at 2000 (2x), equal at 2000.
  assert summary["speedup"]["accuracy"] == {"250": 2.0, "500": 2.0, "1000": 2.0, "2000": "none"}
  assert summary["arms"]["REPA"]["digits_fd_max"][-1] == 0.6
  # A plain run that had got there sooner (a non-monotone curve) is no speed-up.
  records[0]["curve"]["digits_fd"] = records[1]["curve"]["digits_fd"] = [8.0, 0.9, 2.0, 1.0]
  assert repa_digits.summarise(records)["speedup"]["digits_fd"]["1000"] == "none"
  repa_digits.write({"common": {}, **summary}, str(tmp_path / "digits"))
  table = (tmp_path / "digits.md").read_text()
  assert "| 250 | 0.100 (0.100-0.100) | 0.500 (0.500-0.500) | 8.00 (8.00-8.00) |" in table
  assert (tmp_path / "digits.png").exists()


def test_lr_transfer_optimum_and_shift(tmp_path):
  lrs = list(lr_transfer.LRS)
  # A parabola in log2(lr) with its vertex between grid points is found by the refinement.
  x = np.log2(lrs)
  best = lr_transfer.optimum(lrs, (x - np.log2(3e-3)) ** 2)
  np.testing.assert_allclose(best["lr"], 3e-3, rtol=1e-6)
  assert best["lr_grid"] == 4e-3 and not best["edge"]
  assert lr_transfer.optimum(lrs, -x)["edge"]  # Best at the largest lr: flagged.

  def records(p, centres):
    out = []
    for (width, heads), c in zip(lr_transfer.WIDTHS, centres, strict=True):
      for lr in lrs:
        score = 0.1 + (np.log2(lr) - np.log2(c)) ** 2
        overrides = {"parametrization": p, "model.hidden_size": width,
                     "model.num_heads": heads, "optim.lr": lr}  # fmt: skip
        out.append({"overrides": overrides, "status": "finished", "eps_mse": score,
                    "final_loss": score, "workdir": ""})  # fmt: skip
    return out

  # SP's optimum halves with each doubling of width; muP's stays.
  recs = records("sp", [4e-3, 2e-3, 1e-3]) + records("mup", [2e-3, 2e-3, 2e-3])
  analysis = lr_transfer.analyse(recs)["eps_mse"]
  np.testing.assert_allclose(analysis["sp"]["shift_log2"], -2.0, atol=1e-6)
  np.testing.assert_allclose(analysis["mup"]["shift_log2"], 0.0, atol=1e-6)
  assert len(lr_transfer.arms()) == 2 * 3 * 9
  assert lr_transfer.arms()[0] == {"parametrization": "sp", "model.hidden_size": 64,
                                   "model.num_heads": 2, "optim.lr": 2.5e-4}  # fmt: skip
  results = {"common": {}, "records": recs, "analysis": lr_transfer.analyse(recs)}
  lr_transfer.write(results, str(tmp_path / "lr"))
  assert analysis["sp"]["steps_log2"] == pytest.approx({"64->128": -1.0, "128->256": -1.0})
  table = (tmp_path / "lr.md").read_text()
  assert "| sp | eps_mse | 4.00e-03 | 2.00e-03 | 1.00e-03 | -1.00 | -1.00 | -2.00 |" in table
