"""dit.models.flops (and the dit.info command) against the DiT paper's parameter and FLOP
counts for all 12 ImageNet-256 presets."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dit.models.dit import build_model
from dit.models.flops import count_macs, model_info

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import imagenet256_dit  # noqa: E402

# DiT paper (Peebles & Xie 2023), Table 4: forward "Gflops" (= GMACs) at 256x256, 1000 classes.
PUBLISHED_GMACS = {
  "S/8": 0.36, "S/4": 1.41, "S/2": 6.06,
  "B/8": 1.42, "B/4": 5.56, "B/2": 23.01,
  "L/8": 5.01, "L/4": 19.70, "L/2": 80.71,
  "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64,
}  # fmt: skip
# Table 1 / the released checkpoints: parameters in millions.
PUBLISHED_MPARAMS = {"S": 33, "B": 130, "L": 458, "XL": 675}


@pytest.mark.parametrize("preset", imagenet256_dit.PRESETS)
def test_presets_match_paper(preset):
  info = model_info(build_model(imagenet256_dit.get_config(preset).model), train_flops=False)
  assert info["gmacs_fwd"] == pytest.approx(PUBLISHED_GMACS[preset], rel=0.01)
  assert info["params"] / 1e6 == pytest.approx(PUBLISHED_MPARAMS[preset.split("/")[0]], rel=0.01)
  assert info["output_shape"] == [1, 32, 32, 8]


def test_xl2_exact_counts():
  info = model_info(build_model(imagenet256_dit.get_config("XL/2").model), train_flops=False)
  assert info["params"] == 674_834_720
  assert info["fixed_params"] == 294_912  # 256 tokens x 1152.
  assert info["gmacs_fwd"] == pytest.approx(118.6, rel=0.001)


def test_train_flops_are_three_forwards():
  """Backward of a matmul w.r.t. both operands costs two forwards (the patch embed input
  gradient is not needed, hence slightly under 3x)."""
  info = model_info(build_model(imagenet256_dit.get_config("S/8").model))
  assert info["gflops_fwd"] == pytest.approx(2 * info["gmacs_fwd"])
  assert 2.95 * info["gflops_fwd"] < info["gflops_train"] <= 3 * info["gflops_fwd"]


def test_count_macs_closed_form():
  def f(a, b, w):
    y = jnp.einsum("bij,bjk->bik", a, b)  # 2 * 3*4*5 = 120
    z = jax.lax.scan(lambda c, _: (c @ w, None), y, None, length=7)[0]  # 7 * 2*3*5*5 = 1050
    return jax.jit(lambda z: z @ w)(z)  # 2*3*5*5 = 150, inside a sub-jaxpr.

  args = (jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)), jnp.ones((5, 5)))
  assert count_macs(jax.make_jaxpr(f)(*args)) == 120 + 1050 + 150


def test_cli_prints_json():
  root = os.path.join(os.path.dirname(__file__), "..")
  out = subprocess.run(
    [sys.executable, "-m", "dit.info", "--config=configs/imagenet256_dit.py:S/8"],
    cwd=root,
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  info = json.loads(out.stdout)
  assert info["params"] == 33_142_016 and info["gflops_train"] > info["gflops_fwd"] > 0


def test_unknown_preset():
  with pytest.raises(ValueError, match="Unknown DiT preset 'XXL/2'"):
    imagenet256_dit.get_config("XXL/2")
  assert imagenet256_dit.MODEL_PRESETS["XL"] == (1152, 28, 16)
