"""pmap and mesh paths on 1, 2 and 4 forced host devices give the one-device parameters and
logged metrics (loss, grad norm, lr); same-device reruns are bit-identical; checkpoints
restore onto other device counts and meshes; sharding rules and mesh errors.

Tolerance: runs on different device counts sum gradients in a different order, so float32
rounding differs by ~1e-7 relative per step; after 4 AdamW steps (lr 2e-3) parameters agree
to ATOL = 1e-5 absolute (measured: 3e-8; Adam can amplify rounding in near-zero gradient
entries, hence the margin), logged losses and gradient norms to 1e-5 relative.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from dit import parallel, train

ATOL = 1e-5
RUN = {"optim.schedule": "constant", "ckpt_every": 2}

# Four devices: the data-parallel paths, FSDP with gradient accumulation, its rerun, and a
# resume of the one-device step-2 checkpoint onto that mesh.
FSDP = {"parallelism": "mesh", "mesh.data": 2, "mesh.fsdp": 2, "mesh.fsdp_min_size": 256}
FOUR = {
  "pmap4": {"parallelism": "pmap"},
  "fsdp4": {**FSDP, "grad_accum_steps": 2},
  "fsdp4_rerun": {**FSDP, "grad_accum_steps": 2},
  "resumed_fsdp4": {**FSDP, "grad_accum_steps": 2},
}
FOUR_SLOW = {
  "dp4": {"parallelism": "mesh"},
  "tensor4": {"parallelism": "mesh", "mesh.data": 2, "mesh.tensor": 2},
}
TWO_SLOW = {
  "pmap2": {"parallelism": "pmap"},
  "fsdp2": {"parallelism": "mesh", "mesh.data": 1, "mesh.fsdp": 2, "mesh.fsdp_min_size": 256},
}

# Runs `train_and_evaluate` for each {name: [workdir, overrides]} in one process and saves
# the final params and the state's PartitionSpecs next to each run.
DRIVER = """
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import tiny_config
from dit import parallel, train
for name, (workdir, overrides) in json.loads(sys.argv[1]).items():
  state = train.train_and_evaluate(tiny_config(**overrides), workdir)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  specs = {parallel.path_str(p): str(x.sharding.spec) for p, x in leaves}
  with open(workdir + "/specs.json", "w") as f:
    json.dump(specs, f)
  params = jax.tree_util.tree_leaves_with_path(state["params"])
  np.savez(workdir + "/params.npz", **{parallel.path_str(p): np.asarray(x) for p, x in params})
"""


pytestmark = pytest.mark.usefixtures("compilation_cache")


def flat_params(tree) -> dict:
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
  return {parallel.path_str(p): np.asarray(x) for p, x in leaves}


def assert_params_close(a: dict, b: dict, atol=ATOL):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


def logged(workdir, key):
  """The `key` column of a run's metrics.jsonl, one value per logged step."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)[key] for line in f]


def losses(workdir):
  return logged(workdir, "loss")


# The logged metrics every device count and path must reproduce: the loss (averaged over
# the global batch), the gradient norm (of the averaged gradient, before clipping) and the
# learning rate. A sum over devices instead of a mean moves grad_norm by the device count
# even where AdamW's scale invariance and clipping keep the parameters within ATOL.
LOGGED = ("loss", "grad_norm", "lr")


def assert_logged_close(a, b):
  for key in LOGGED:
    np.testing.assert_allclose(logged(a, key), logged(b, key), rtol=1e-5, err_msg=key)


def resumable_copy(src, dst):
  """A copy of a finished run's workdir without its last checkpoint (step 4)."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("params.npz", "specs.json"))
  shutil.rmtree(os.path.join(dst, "ckpt", "4"))
  return str(dst)


def run_devices(runs: dict, root, devices: int, cache_dir: str) -> dict:
  """Trains `runs` in one subprocess with `devices` forced CPU devices; returns workdirs."""
  os.makedirs(root, exist_ok=True)
  workdirs = {name: str(root / name) for name in runs}
  spec = {name: [workdirs[name], {**RUN, **runs[name]}] for name in runs}
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_DEFAULT_MATMUL_PRECISION="highest",
  )
  result = subprocess.run(
    [sys.executable, "-c", DRIVER, json.dumps(spec)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return workdirs


def load_npz(workdir) -> dict:
  with np.load(os.path.join(workdir, "params.npz")) as f:
    return dict(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One device: 4 steps, checkpoints at 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("one_device") / "run")
  state = train.train_and_evaluate(tiny_config(**RUN), workdir)
  return flat_params(state["params"]), workdir


@pytest.fixture(scope="module")
def four(tmp_path_factory, reference, compilation_cache):
  root = tmp_path_factory.mktemp("four")
  resumable_copy(reference[1], root / "resumed_fsdp4")
  return run_devices(FOUR, root, 4, compilation_cache)


@pytest.mark.slow  # The four-device fixture trains in a subprocess (about 52 s).
@pytest.mark.parametrize("name", ["pmap4", "fsdp4"])
def test_four_devices_match_one_device(four, reference, name):
  ref_params, ref_dir = reference
  assert_params_close(load_npz(four[name]), ref_params)
  assert_logged_close(four[name], ref_dir)


@pytest.mark.slow  # The four-device fixture trains in a subprocess (about 52 s).
def test_pmap_and_mesh_paths_log_the_same_metrics(four):
  """pmap (pmean of gradients) and mesh (jit over the global batch, FSDP with 2 micro-
  batches): the same loss, gradient norm and learning rate at every step."""
  assert_logged_close(four["pmap4"], four["fsdp4"])
  assert len(set(logged(four["pmap4"], "grad_norm"))) == 4  # Not a constant that would agree.


@pytest.mark.slow  # The four-device fixture trains in a subprocess (about 52 s).
def test_rerun_on_same_devices_is_bit_identical(four):
  a, b = load_npz(four["fsdp4"]), load_npz(four["fsdp4_rerun"])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert losses(four["fsdp4"]) == losses(four["fsdp4_rerun"])


@pytest.mark.slow  # The four-device fixture trains in a subprocess (about 52 s).
def test_mesh_shards_state(four):
  with open(os.path.join(four["fsdp4"], "specs.json")) as f:
    specs = json.load(f)
  # FSDP over the largest dimension, for params, EMA and Adam moments alike.
  fc1 = [k for k in specs if k.endswith("blocks_0/mlp/fc1/kernel")]
  assert len(fc1) == 4, fc1  # params, ema_params, mu, nu
  assert all(specs[k] == str(P(None, "fsdp")) for k in fc1), {k: specs[k] for k in fc1}
  assert specs["params/blocks_0/mlp/fc1/bias"] == str(P(None))  # Under fsdp_min_size.
  assert specs["step"] == str(P())


@pytest.mark.slow  # The four-device fixture trains in a subprocess (about 52 s).
def test_checkpoint_restores_onto_more_devices(four, reference):
  """The one-device step-2 checkpoint, resumed on a 2x2 (data, fsdp) mesh."""
  assert_params_close(load_npz(four["resumed_fsdp4"]), reference[0])


@pytest.mark.slow  # The four-device fixture trains in a subprocess (about 52 s).
def test_checkpoint_restores_onto_fewer_devices(four, reference, tmp_path):
  """The 2x2-mesh step-2 checkpoint, resumed with pmap on this one device."""
  workdir = resumable_copy(four["fsdp4"], tmp_path / "run")
  state = train.train_and_evaluate(tiny_config(**RUN), workdir)
  assert_params_close(flat_params(state["params"]), reference[0])


@pytest.mark.slow
def test_more_device_counts_and_meshes(tmp_path, reference, compilation_cache):
  ref_params, ref_dir = reference
  for devices, runs in ((4, FOUR_SLOW), (2, TWO_SLOW)):
    workdirs = run_devices(runs, tmp_path / f"d{devices}", devices, compilation_cache)
    for workdir in workdirs.values():
      assert_params_close(load_npz(workdir), ref_params)
      assert_logged_close(workdir, ref_dir)
  with open(os.path.join(tmp_path, "d4", "tensor4", "specs.json")) as f:
    specs = json.load(f)
  assert specs["params/blocks_0/attn/qkv/kernel"] == str(P(None, "tensor"))
  assert specs["params/blocks_0/mlp/fc2/kernel"] == str(P("tensor", None))


# ---- Sharding rules and meshes (no training) ---------------------------------------------


def mesh(data=1, fsdp=1, tensor=1):
  return AbstractMesh((data, fsdp, tensor), parallel.MESH_AXES)


def test_param_spec_rules():
  spec = parallel.param_spec
  # FSDP on the largest dimension divisible by the fsdp size; small arrays replicated.
  assert spec("params/blocks_0/mlp/fc1/kernel", (1152, 4608), mesh(fsdp=4)) == P(None, "fsdp")
  assert spec("params/x_embedder/kernel", (32, 1152), mesh(fsdp=4)) == P(None, "fsdp")
  assert spec("params/x_embedder/kernel", (6, 1152), mesh(fsdp=4)) == P(None, None)
  assert spec("params/y_embedder/embedding", (1001, 1152), mesh(fsdp=4)) == P(None, "fsdp")
  assert spec("params/blocks_0/mlp/fc1/bias", (4608,), mesh(fsdp=4)) == P(None)
  assert spec("params/blocks_0/mlp/fc1/bias", (4608,), mesh(fsdp=4), min_fsdp_size=1) == P("fsdp")
  # Tensor parallel: column-parallel into attention / MLP, row-parallel out of them.
  t = mesh(tensor=2)
  assert spec("params/blocks_0/attn/qkv/kernel", (1152, 3456), t) == P(None, "tensor")
  assert spec("params/blocks_0/attn/proj/kernel", (1152, 1152), t) == P("tensor", None)
  assert spec("params/blocks_0/mlp/fc1/kernel", (1152, 4608), t) == P(None, "tensor")
  assert spec("opt_state/0/mu/blocks_0/mlp/fc2/kernel", (4608, 1152), t) == P("tensor", None)
  # Both: tensor first, FSDP on the largest remaining dimension.
  both = spec("params/blocks_0/mlp/fc1/kernel", (1152, 4608), mesh(fsdp=2, tensor=2))
  assert both == P("fsdp", "tensor")
  assert spec("step", (), mesh(fsdp=4)) == P()


def test_make_mesh():
  cpu = jax.devices()[0]
  m = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=[cpu])
  assert dict(m.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert parallel.data_parallel_size(m) == 1


@pytest.mark.parametrize(
  "shape, message",
  [
    ({"data": 2}, "needs 2 devices, but 1 are available"),
    ({"data": -1, "fsdp": -1}, "At most one mesh axis may be -1"),
    ({"data": -1, "fsdp": 3}, "does not divide the 1 devices"),
    ({"data": 0}, "needs 0 devices"),
  ],
)
def test_make_mesh_errors(shape, message):
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(shape, devices=jax.devices()[:1])
