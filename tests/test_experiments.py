"""experiments/: override handling, power-law fit, and a 2-point sweep and a 2-arm ablation
run end to end on tiny digits settings (the files they write are checked)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES

sys.path.insert(0, str(ROOT))

from dit import cli  # noqa: E402
from experiments import ablations, distill_digits, scaling, sweep  # noqa: E402

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
  config = sweep.apply_overrides(base, {"model.depth": 2, "model.qk_norm": True})
  assert config.model.depth == 2 and config.model.qk_norm is True
  assert config.is_locked
  assert base.model.depth == 4 and "qk_norm" not in base.model  # The base is unchanged.
  assert sweep.get(base, "model.qk_norm") is False  # DiT's default.
  with pytest.raises(cli.UserError, match=r"'model.depthh': 'model' has keys \[.*'qk_norm'"):
    sweep.apply_overrides(base, {"model.depthh": 2})
  with pytest.raises(cli.UserError, match="optimm"):
    sweep.apply_overrides(base, {"optimm.lr": 1.0})
  with pytest.raises(cli.UserError, match="'model.qk_norm' takes a value of type bool"):
    sweep.apply_overrides(base, {"model.qk_norm": "yes"})


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
  config = cli.apply_overrides(base, ["model.qk_norm=True"], defaults={"model.qk_norm": False})
  assert config.model.qk_norm is True


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
    (f"{DIGITS}:x", "Config '.*digits.py:x': .*get_config"),  # It takes no argument.
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
  arm = {"model.qk_norm": False, "sample.steps": 5, "diffusion.prediction": "v"}
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
  assert fit["r2"] == pytest.approx(1.0)
  assert scaling.power_law_fit([1.0], [2.0]) is None


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


def test_two_point_sweep_end_to_end(tmp_path):
  spec = [
    {"model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "model.patch_size": 4},
    {"model.hidden_size": 64, "model.depth": 1, "model.num_heads": 2, "model.patch_size": 4},
  ]
  out = tmp_path / "out" / "scaling"
  results = scaling.run_sweep(spec, str(tmp_path / "runs"), str(out), base_spec=DIGITS, common=TINY)
  saved = json.loads((tmp_path / "out" / "scaling.json").read_text())
  assert _is_png(tmp_path / "out" / "scaling.png")
  assert len(saved["runs"]) == 2 and all(r["finished"] for r in saved["runs"])
  small, big = saved["runs"]
  assert small["params"] < big["params"]
  for r in saved["runs"]:
    # Training compute = dit.info's per-image train FLOPs x batch x steps.
    assert r["train_gflops"] == pytest.approx(r["gflops_train_per_image"] * 8 * 3)
    assert r["steps"] == 3 and np.isfinite(r["final_loss"])
    assert 0.0 <= r["eval"]["accuracy"] <= 1.0 and r["eval"]["digits_fd"] > 0
    assert r["curve"][-1][0] == pytest.approx(r["train_gflops"])
  assert saved["fit_loss"]["r2"] == pytest.approx(1.0)  # Two points fit exactly.
  assert saved["fit_eval"] is not None
  # Re-plotting from the run directories alone gives the same table.
  again = scaling.run_sweep(
    spec, str(tmp_path / "runs"), str(out), base_spec=DIGITS, common=TINY, train=False
  )
  assert again["runs"] == results["runs"]


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
