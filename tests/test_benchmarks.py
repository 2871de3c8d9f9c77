"""The benchmark scripts run end to end on a tiny config and write the fields they promise.

No timing assertions: speed is measured by the scripts themselves, not by tests.
"""

import datetime
import json
import statistics
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # For `benchmarks`.

from benchmarks import accelerator, common, memory, sample, train, vs_pytorch  # noqa: E402
from benchmarks import compile as compile_bench  # noqa: E402
from dit.cli import UserError  # noqa: E402
from dit.models import dit as dit_model  # noqa: E402
from dit.models import flops  # noqa: E402

# A one-block DiT on 16x16x4 latents: compiles in seconds.
TINY = ["--model=S/8", "--overrides=depth=1,hidden_size=64,num_heads=2,input_size=16"]
META = ("date", "backend", "device_kind", "versions", "load_average_1min")


@pytest.fixture
def quick_compiles():
  """XLA without most optimisations: smoke runs of the benchmarks compile in about half the
  time (they check the fields written, not the figures)."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def _read(path):
  with open(path) as f:
    return json.load(f)


def _config(overrides):
  return common.dit_config(
    "S/8", batch=2, dtype="float32", attention="xla", remat=False, overrides=overrides
  )


def test_dit_config_overrides_are_typed_by_the_config():
  config = _config("depth=1, mlp_ratio=2.5,remat=true,dtype=bfloat16")
  assert (config.batch_size, config.parallelism, config.model.attention_impl) == (2, "mesh", "xla")
  assert (config.model.depth, config.model.mlp_ratio, config.model.remat) == (1, 2.5, True)
  assert config.model.dtype == "bfloat16" and config.is_locked  # Overrides come last.
  with pytest.raises(UserError, match="key=value"):
    _config("depth")


def test_unknown_model_field_is_an_error():
  with pytest.raises(UserError, match=r"Unknown config key 'model.depht': 'model' has keys \["):
    _config("depht=1")
  with pytest.raises(UserError, match="'model.depth' takes a value of type int"):
    _config("depth=1.5")


def test_timing_helpers_count_calls():
  calls = []
  out = common.time_interleaved(
    {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
    windows=2,
    steps_per_window=3,
    warmup=1,
  )
  assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
  assert len(out["a"]["window_s_per_call"]) == 2 and out["b"]["s_per_call"] >= 0
  with pytest.raises(ValueError, match="windows"):
    common.time_median(lambda: None, windows=0, steps_per_window=1)


@pytest.mark.slow  # Train-step compiles (about 16 s).
def test_train_benchmark(tmp_path):
  out = tmp_path / "train.json"
  args = ["--batch=2", "--windows=2", "--steps_per_window=1", "--warmup=1", f"--out={out}"]
  train.main([*TINY, "--dtype=float32", *args])
  r = _read(out)
  # Throughput from the timed windows: steps/s = 1 / the median window's seconds per step.
  assert len(r["window_s_per_step"]) == 2 and min(r["window_s_per_step"]) > 0
  assert r["steps_per_s"] == pytest.approx(1 / statistics.median(r["window_s_per_step"]))
  assert r["images_per_s"] == pytest.approx(2 * r["steps_per_s"])
  # Model FLOPs: dit.models.flops' count (dit.info's) of one image times the batch of 2.
  config = _config("depth=1,hidden_size=64,num_heads=2,input_size=16")
  per_image = flops.model_info(dit_model.build_model(config.model))["gflops_train"]
  assert r["model_gflops_per_step_per_device"] == pytest.approx(2 * per_image)
  assert r["model_tflops_per_device"] == pytest.approx(
    r["model_gflops_per_step_per_device"] * r["steps_per_s"] / 1e3
  )
  # The loss is the update step's own: the 4th step (1 warmup + 2 windows of 1 + 1) on the
  # benchmark's fixed batch, rerun here with the same step function and start.
  step, state, batch = train.make_step(config)
  for _ in range(4):
    state, metrics = step(state, batch, {})
  assert r["final_loss"] == pytest.approx(float(metrics["loss"]), rel=1e-6)
  assert r["backend"] == jax.default_backend() and r["device_kind"] == jax.devices()[0].device_kind
  assert r["versions"]["jax"] == jax.__version__ and r["load_average_1min"] >= 0
  datetime.datetime.fromisoformat(r["date"])
  assert r["mfu"] is None if r["peak_tflops_per_device"] is None else 0 < r["mfu"] < 1
  assert r["config_model"]["depth"] == 1 and r["model"] == "S/8"
  mem = r["compiled_memory_bytes"]
  assert mem["alias"] > 0 and mem["total"] >= mem["argument"]  # The state is donated.
  # dit.info's count (model FLOPs) and XLA's cost analysis agree to within the non-matmul work.
  assert r["model_gflops_per_step_per_device"] > 0
  if r["xla_gflops_per_step_per_device"] is not None:
    ratio = r["xla_gflops_per_step_per_device"] / r["model_gflops_per_step_per_device"]
    # XLA also counts the elementwise optimizer, EMA and NaN-guard work, a large share of a
    # tiny model's step.
    assert 0.8 < ratio < 4.0, ratio


def test_sample_benchmark(tmp_path):
  out = tmp_path / "sample.json"
  sample.main([*TINY, "--batch=2", "--steps=2", "--windows=1", "--sampler=ddpm", f"--out={out}"])
  r = _read(out)
  (row,) = r["results"]
  assert row["steps"] == 2 and row["scan_images_per_s"] > 0 and row["loop_images_per_s"] > 0
  # The Python loop runs the same steps with the same noise as the scan.
  assert row["max_abs_diff_scan_vs_loop"] < 1e-4
  assert r["model_batch"] == 4  # CFG doubles the batch.
  assert all(k in r for k in META)


def test_vs_pytorch_benchmark(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  out = tmp_path / "vs.json"
  # --allow_noisy: a smoke run's figures never count, so it writes them whatever the load.
  args = ["--batch=2", "--windows=2", "--steps_per_window=1", "--warmup=1", "--allow_noisy"]
  vs_pytorch.main([*TINY, *args, f"--out={out}"])
  r = _read(out)
  assert r["ratio_ours_over_pytorch"] == pytest.approx(
    r["ours_s_per_step"] / r["pytorch_s_per_step"]
  )
  assert set(r["window_s_per_step"]) == {"ours", "pytorch"}
  # Same transformer; diffusers has a timestep/label embedder in every block, we have one.
  assert r["ours_params"] <= r["pytorch_params"] < 2 * r["ours_params"]
  assert all(k in r for k in (*META, "torch_threads", "load_average_1min_before"))


def test_memory_search_finds_the_largest_fitting_batch(monkeypatch):
  # An affine memory model: 1 GB fixed + 0.3 GB per image; budget 10 GB -> 30 images.
  def fake(args, batch, remat):
    per_image = 0.1e9 if remat else 0.3e9
    return {"total": int(1e9 + per_image * batch)}

  monkeypatch.setattr(memory, "step_memory", fake)
  args = memory.parse_args(["--budget_gb=10", "--granularity=2", "--max_batch=1000"])
  off, on = memory.search(args, remat=False), memory.search(args, remat=True)
  assert off["max_batch_per_device"] == 30 and on["max_batch_per_device"] == 90
  assert off["bytes_per_image"] == pytest.approx(0.3e9)
  assert len(off["probes"]) <= 6  # The line's guess is checked, not a long bisection.
  args = memory.parse_args(["--budget_gb=0.5"])
  assert memory.search(args, remat=False)["max_batch_per_device"] == 0


@pytest.mark.slow  # Several compiles.
def test_memory_benchmark(tmp_path):
  out = tmp_path / "memory.json"
  memory.main(
    [*TINY, "--dtype=float32", "--budget_gb=0.012", "--granularity=4", "--max_batch=32",
     f"--out={out}"]
  )  # fmt: skip
  r = _read(out)
  for mode in ("remat_off", "remat_on"):
    res = r[mode]
    assert 4 <= res["max_batch_per_device"] <= 64
    fits = [p for p in res["probes"] if p["total"] <= 0.012e9]
    assert max(p["batch_per_device"] for p in fits) == res["max_batch_per_device"]
  assert all(k in r for k in META)


def test_memory_grid_targets(monkeypatch, tmp_path):
  """The grid's rows and targets from fake figures, on the bounds: remat 40% of no remat at
  depth 6 (ratio met), and 25% more at depth 12 than at 6 (growth met); then just past them."""
  fake = {(6, False): 100.0, (6, True): 40.0, (12, False): 200.0, (12, True): 50.0}

  def grad_temp(config):
    m = config.model
    mib = fake[m.depth, m.remat] + (1.0 if m.remat_policy else 0.0) + (2.0 if m.scan else 0.0)
    return int(mib * memory.MIB)

  monkeypatch.setattr(memory, "grad_temp_bytes", grad_temp)
  out = tmp_path / "memory.json"
  policies = "--policies=,dots_saveable,offload_dot_with_no_batch_dims"
  r = memory.main(["--grid", *TINY, "--measures=grad", policies, f"--out={out}"])
  assert _read(out)["targets"] == json.loads(json.dumps(r["targets"]))
  rows = {(x["depth"], x["scan"], x["remat"], x["remat_policy"]): x for x in r["rows"]}
  assert len(rows) == 2 * 2 * 4  # Depths x scans x (off + 3 policies).
  assert "needs scan=True" in rows[6, False, True, "offload_dot_with_no_batch_dims"]["skipped"]
  assert rows[12, True, True, "dots_saveable"]["grad_temp_mib"] == 53.0  # 50 + 1 + 2.
  off = r["targets"]["scan_off_grad"]
  assert off["remat_over_no_remat"] == {6: 0.4, 12: 0.25}
  assert off["growth_depth_6_to_12"] == 0.25 and off["ratio_met"] and off["growth_met"]
  on = r["targets"]["scan_on_grad"]  # Plain remat only: 42 and 52 MiB vs 102 and 202.
  assert on["remat_over_no_remat"] == {6: 42 / 102, 12: 52 / 202}
  assert on["growth_depth_6_to_12"] == pytest.approx(52 / 42 - 1) and on["growth_met"]
  assert r["batch"] == 16 and r["dtype"] == "float32" and all(k in r for k in META)
  # Just past the bounds: 41% of no remat, 26% more.
  fake.update({(6, True): 41.0, (12, True): 41.0 * 1.26})
  args = ["--grid", *TINY, "--measures=grad", "--scans=off", "--policies=", f"--out={out}"]
  off = memory.main(args)["targets"]["scan_off_grad"]
  assert not off["ratio_met"] and not off["growth_met"]


def test_memory_grid_compiles(tmp_path, quick_compiles):
  """One real row: the temporaries of a tiny scanned, rematerialised model's gradient."""
  out = tmp_path / "memory.json"
  args = ["--depths=1", "--scans=on", "--remat=on", "--policies=", "--measures=grad", "--batch=2"]
  r = memory.main(["--grid", *TINY, *args, f"--out={out}"])
  (row,) = r["rows"]
  assert (row["depth"], row["scan"], row["remat"]) == (1, True, True)
  assert row["grad_temp_bytes"] > 0 and row["grad_temp_mib"] == row["grad_temp_bytes"] / 2**20


@pytest.mark.slow  # Train-step compiles (about 10 s).
def test_compile_benchmark_tiny(tmp_path, quick_compiles):
  out = tmp_path / "compile.json"
  r = compile_bench.main(["--tiny", "--depths=1", "--scans=on", "--large=off", f"--out={out}"])
  (row,) = _read(out)["entries"]
  assert (row["model"], row["depth"], row["scan"], row["hidden_size"]) == ("S/8", 1, True, 32)
  assert row["compile_s"] > 0 and row["total_s"] == row["lower_s"] + row["compile_s"]
  loads = (r["load_average_1min_before"], r["load_average_1min_after"])
  assert r["noisy"] == (max(loads) > r["cpu_count"]) and r["tiny"]
  assert jax.config.jax_enable_compilation_cache  # Switched back on after the run.
  # The full list of entries: the small model at depths 6, 12, 24 x scan, then XL/2 scanned.
  full = compile_bench.entries(compile_bench.parse_args([]))
  assert [(e["model"], e["depth"], e["scan"]) for e in full] == [
    ("S/2", d, s) for d in (6, 12, 24) for s in (False, True)
  ] + [("XL/2", None, True)]


@pytest.mark.slow  # Five compiles of the train step.
def test_compile_benchmark_tiny_all_entries(tmp_path):
  out = tmp_path / "compile.json"
  r = compile_bench.main(["--tiny", f"--out={out}"])
  got = [(e["model"], e["depth"], e["scan"]) for e in r["entries"]]
  assert got == [("S/8", d, s) for d in (1, 2) for s in (False, True)] + [("XL/8", 2, True)]
  assert set(r["unrolled_over_scan_total_s"]) == {"1", "2"}


@pytest.mark.slow  # The whole tiny suite (about 17 s).
def test_accelerator_suite_tiny(tmp_path, quick_compiles):
  """The whole suite on the CPU: train (one variant, 2 steps), sampler, PyTorch skipped."""
  out = tmp_path / "acc.json"
  r = accelerator.main(["--tiny", "--variants=scan_remat", f"--out={out}"])
  assert _read(out)["train"] == json.loads(json.dumps(r["train"]))
  (row,) = r["train"]
  assert "error" not in row and "skipped" not in row, row
  assert (row["variant"], row["scan"], row["remat"]) == ("scan_remat", True, True)
  assert row["batch"] == 2 and row["images_per_s"] == pytest.approx(2 * row["steps_per_s"])
  assert row["model_tflops_per_device"] > 0 and row["mfu"] is None  # No peak for a CPU.
  assert r["best_train"] == {"variant": "scan_remat", "attention": "xla"}
  s = r["sample"]
  assert s["steps"] == 2 and s["scan_images_per_s"] > 0 and s["loop_images_per_s"] > 0
  assert s["max_abs_diff_scan_vs_loop"] < 1e-4 and s["model_batch"] == 4  # CFG: 2 x 2.
  assert "skipped" in r["pytorch"]  # No CUDA here.
  assert r["tiny"] and r["peak_tflops_per_device"] is None and all(k in r for k in META)


@pytest.mark.slow  # Both tiny variants: two more train-step compiles.
def test_accelerator_suite_tiny_variants(tmp_path):
  r = accelerator.main(["--tiny", f"--out={tmp_path / 'acc.json'}"])
  rows = {row["variant"]: row for row in r["train"]}
  assert set(rows) == set(accelerator.TINY_VARIANTS)
  assert all(row["images_per_s"] > 0 for row in rows.values())
  assert (rows["unrolled"]["scan"], rows["unrolled"]["remat"]) == (False, False)


def test_accelerator_batch_fallback_and_budgets(monkeypatch, tmp_path):
  """Out of memory tries the next batch; other errors are recorded; items over the section's
  budget are skipped with the reason; the full run's variant and attention lists."""
  calls = []

  def fake_run(args):
    calls.append(args.batch)
    if args.batch > 64:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    if not args.remat and "scan" not in args.overrides:  # The unrolled variant.
      raise ValueError("broken")
    return {k: 1.0 for k in accelerator.TRAIN_KEYS} | {"batch": args.batch}

  monkeypatch.setattr(accelerator.train_bench, "run", fake_run)
  monkeypatch.setattr(accelerator, "_free", lambda: None)  # Nothing compiled to free.
  args = accelerator.parse_args(["--batches=256,128,64,32", "--attention=xla"])
  assert args.model == "XL/2" and args.dtype == "bfloat16"
  assert args.variants.split(",") == list(accelerator.VARIANTS)
  rows = accelerator.train_section(args, accelerator.Budget(1e6))
  assert [r["variant"] for r in rows] == ["scan_remat", "scan", "unrolled", "unrolled_remat"]
  assert rows[0]["batch"] == 64 and [a["batch_per_device"] for a in rows[0]["attempts"]] == [
    256,
    128,
  ]
  assert calls[:3] == [256, 128, 64]
  assert "ValueError: broken" in rows[2]["error"]  # Recorded, the next variant still runs.
  assert rows[3]["batch"] == 64
  # A budget shorter than the previous item: the rest are skipped, with the reason.
  budget = accelerator.Budget(10.0)
  budget.last = 20.0
  skipped = accelerator.train_section(args, budget)
  assert [r["skipped"][-13:] for r in skipped] == ["20 s expected"] * 2 + ["40 s expected"] * 2
  assert all(r["skipped"].startswith("over budget: 10 s left of 10 s") for r in skipped)
  assert accelerator.sample_section(args, accelerator.Budget(0.0))["skipped"].startswith("over")
