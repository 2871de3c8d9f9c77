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

from benchmarks import common, memory, sample, train, vs_pytorch  # noqa: E402
from dit.cli import UserError  # noqa: E402
from dit.models import dit as dit_model  # noqa: E402
from dit.models import flops  # noqa: E402

# A one-block DiT on 16x16x4 latents: compiles in seconds.
TINY = ["--model=S/8", "--overrides=depth=1,hidden_size=64,num_heads=2,input_size=16"]
META = ("date", "backend", "device_kind", "versions", "load_average_1min")


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
    assert 0.8 < ratio < 3.0, ratio


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
  vs_pytorch.main(
    [*TINY, "--batch=2", "--windows=2", "--steps_per_window=1", "--warmup=1", f"--out={out}"]
  )
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
