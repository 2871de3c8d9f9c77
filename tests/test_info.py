"""dit.models.flops (and the dit.info command) against the DiT paper's parameter and FLOP
counts for all 12 ImageNet-256 presets, and against a hand count for each block option."""

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


# One small class-conditional adaLN-Zero DiT per block option, counted by hand below.
SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
             num_classes=10, learn_sigma=False)  # fmt: skip
OPTIONS = [
  {},
  dict(norm="rmsnorm"),
  dict(mlp="swiglu"),
  dict(pos_embed="rope"),
  dict(pos_embed="both"),
  dict(qk_norm="layernorm"),
  dict(qk_norm="rmsnorm"),
  dict(norm="rmsnorm", mlp="swiglu", pos_embed="both", qk_norm="rmsnorm"),  # LightningDiT.
]


def hand_count(norm="layernorm", mlp="gelu", pos_embed="sincos", qk_norm=""):
  """(params, forward MACs, fixed values) of SMALL with the options, written out layer by layer.

  D 32, depth 2, N = (8 / 2)^2 = 16 tokens, patches of P = 2 * 2 * 3 = 12 values, K 10
  classes, F 256 timestep frequencies, head dim 16, output 2 * 2 * 3 = 12 per token.
  """
  d, depth, n, patch, k, f, head, out = 32, 2, 16, 12, 10, 256, 16, 12
  hidden = 4 * d if mlp == "gelu" else int(2 / 3 * 4 * d)  # 128, or SwiGLU's 85.
  params = (patch * d + d) + (f * d + d + d * d + d) + (k + 1) * d  # x, t, y embedders.
  macs = n * patch * d + f * d + d * d  # The label lookup is not a matmul.
  block = (d * 6 * d + 6 * d) + (d * 3 * d + 3 * d) + (d * d + d)  # adaLN, qkv, proj.
  block_macs = d * 6 * d + n * d * 3 * d + n * n * d + n * n * d + n * d * d  # q k^T and (.) v.
  if mlp == "gelu":  # fc1, fc2.
    block += d * hidden + hidden + hidden * d + d
    block_macs += 2 * n * d * hidden
  else:  # fc1 is the gate and the value (2 matmuls), then fc2: 3 matmuls of D x hidden.
    block += d * 2 * hidden + 2 * hidden + hidden * d + d
    block_macs += 3 * n * d * hidden
  block += 2 * d if norm == "rmsnorm" else 0  # norm1, norm2 scales; LayerNorm has none.
  block += {"": 0, "layernorm": 2 * 2 * head, "rmsnorm": 2 * head}[qk_norm]  # q_norm, k_norm.
  params += depth * block + (d * 2 * d + 2 * d) + (d * out + out)  # Final adaLN and linear.
  params += d if norm == "rmsnorm" else 0  # norm_final's scale.
  macs += depth * block_macs + d * 2 * d + n * d * out
  fixed = (n * d if pos_embed != "rope" else 0) + (2 * n * head if pos_embed != "sincos" else 0)
  return params, macs, fixed


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(map(str, o.values())) or "dit")
def test_params_and_flops_of_each_block_option_match_a_hand_count(options):
  info = model_info(build_model(dict(SMALL, **options)), train_flops=False)
  params, macs, fixed = hand_count(**options)
  assert (info["params"], info["fixed_params"]) == (params, fixed)
  assert round(info["gmacs_fwd"] * 1e9) == macs  # RoPE's elementwise rotation is not counted.
