"""experiments/: override handling, power-law fit, and a 2-point sweep and a 2-arm ablation
run end to end on tiny digits settings (the files they write are checked)."""

import json
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))

from experiments import ablations, distill_digits, scaling, sweep  # noqa: E402

DIGITS = str(ROOT / "configs/digits.py")
# Tiny runs: 16x16 digits, patch 4 (16 tokens), a few steps, a few samples in 2 DDIM steps.
TINY = {
  "total_steps": 3,
  "batch_size": 8,
  "log_every": 1,
  "ckpt_every": 3,
  "sample_every": 0,
  "progress_bar": False,
  "optim.warmup_steps": 0,
  "model.patch_size": 4,
  "model.hidden_size": 32,
  "model.depth": 1,
  "model.num_heads": 2,
  "sample.num": 0,
  "sample.steps": 2,
  "eval.num_samples": 10,
  "eval.batch_size": 10,
}


def test_apply_overrides_sets_adds_model_fields_and_rejects_unknown_keys():
  base = sweep.load_base(DIGITS)
  config = sweep.apply_overrides(base, {"model.depth": 2, "model.conditioning": "in_context"})
  assert config.model.depth == 2 and config.model.conditioning == "in_context"
  assert base.model.depth == 4 and "conditioning" not in base.model  # The base is unchanged.
  assert sweep.get(base, "model.conditioning") == "adaln_zero"  # DiT's default.
  with pytest.raises(ValueError, match="model.depthh"):
    sweep.apply_overrides(base, {"model.depthh": 2})
  with pytest.raises(ValueError, match="optimm"):
    sweep.apply_overrides(base, {"optimm.lr": 1.0})


def test_train_overrides_and_slug():
  base = sweep.load_base(DIGITS)
  arm = {"model.conditioning": "adaln_zero", "sample.steps": 5, "diffusion.prediction": "v"}
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


def test_two_arm_ablation_end_to_end(tmp_path):
  arms = {
    "conditioning": [{"model.conditioning": "adaln_zero"}, {"model.conditioning": "in_context"}],
    # Sampling-only arm: reuses the adaln_zero model, no third training run.
    "sampler_nfe": [{"sample.sampler": "euler", "sample.steps": 2}],
  }
  out = tmp_path / "docs" / "ablations"
  runs = tmp_path / "runs"
  results = ablations.run_ablations(
    list(arms), str(runs), str(out), base_spec=DIGITS, common=TINY, ablations=arms
  )
  assert sorted(p.name for p in runs.iterdir()) == ["base", "conditioning=in_context"]
  saved = json.loads((tmp_path / "docs" / "ablations.json").read_text())
  assert saved == json.loads(json.dumps(results))
  cond = saved["ablations"]["conditioning"]
  assert [r["arm"] for r in cond] == ["conditioning=adaln_zero", "conditioning=in_context"]
  assert all(r["steps"] == 3 for r in cond)  # Equal steps.
  for r in cond:
    assert {"final_loss", "eps_mse", "accuracy", "digits_fd"} <= set(r)
  table = (tmp_path / "docs" / "ablations.md").read_text()
  assert "### conditioning" in table and "| conditioning=in_context | 3 |" in table
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
