"""DiT Figure 5's conditioning variants (block types): adaLN-Zero, adaLN, cross-attention,
in-context; adaLN-single alongside where it applies."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_dit
import pytest

from dit.models.dit import BLOCKS, DiT, build_model
from dit.models.flops import model_info

D, DEPTH, CLASSES, P, S = 32, 2, 10, 4, 8


def make(block, **kw):
  return DiT(
    input_size=S,
    patch_size=P,
    in_channels=1,
    hidden_size=D,
    depth=DEPTH,
    num_heads=2,
    num_classes=CLASSES,
    learn_sigma=False,
    block=block,
    **kw,
  )


def inputs(b=2):
  x = jax.random.normal(jax.random.key(1), (b, S, S, 1))
  return x, jnp.array([10.0, 500.0])[:b], {"label": jnp.array([1, 2])[:b]}


def random_params(model):
  """Params with every leaf random, so zero-initialised paths do not hide the wiring."""
  x, t, cond = inputs()
  params = model.init(jax.random.key(0), x, t, cond)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return tree.unflatten(
    [0.3 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
  )


def n_params(model):
  x, t, cond = inputs()
  params = model.init(jax.random.key(0), x, t, cond)["params"]
  return sum(p.size for p in jax.tree.leaves(params))


def test_default_is_adaln_zero_with_the_converter_names():
  model = make("adaln_zero")
  x, t, cond = inputs()
  params = model.init(jax.random.key(0), x, t, cond)["params"]
  assert set(params["blocks_0"]) == {"adaLN_modulation_1", "attn", "mlp"}
  assert params["blocks_0"]["adaLN_modulation_1"]["kernel"].shape == (D, 6 * D)
  assert set(params["final_layer"]) == {"adaLN_modulation_1", "linear"}
  assert DiT.block == "adaln_zero"
  # Zero-initialised gates: every fresh block is the identity on its tokens.
  assert not np.any(params["blocks_0"]["adaLN_modulation_1"]["kernel"])


def test_parameter_counts_follow_the_architectures():
  """Closed-form differences from adaLN-Zero (per block, plus the final layer)."""
  base = n_params(make("adaln_zero"))
  ada_zero_block = D * 6 * D + 6 * D
  ada_zero_final = D * 2 * D + 2 * D
  ln = 2 * D  # LayerNorm scale + bias.
  # adaLN: shift and scale only (4 D outputs), no gates.
  assert n_params(make("adaln")) == base - DEPTH * (2 * D * D + 2 * D)
  # in-context: no modulation at all; two LayerNorms per block and one before the output.
  in_context = base - DEPTH * ada_zero_block - ada_zero_final + DEPTH * 2 * ln + ln
  assert n_params(make("in_context")) == in_context
  # cross-attention: q, kv, proj of width D and one more LayerNorm per block.
  cross = in_context + DEPTH * ((D * D + D) + (D * 2 * D + 2 * D) + (D * D + D) + ln)
  assert n_params(make("cross_attn")) == cross


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_output_is_the_reference_function_of_timestep_and_label(block):
  """For each block type the output at (t, y), (t + 100, y) and (t, y + 3) is what the NumPy
  reference of that variant (tests/numpy_dit.py, from the DiT paper's Figure 5) computes, and
  the three differ by far more than the tolerance: both inputs reach the output, the way the
  variant says."""
  model = make(block)
  params = random_params(model)
  x, t, cond = inputs()
  fields = dict(
    input_size=S, patch_size=P, in_channels=1, hidden_size=D, depth=DEPTH, num_heads=2,
    num_classes=CLASSES, learn_sigma=False, block=block,
  )  # fmt: skip
  host = jax.device_get(params)
  outs = []
  for tt, label in ((t, cond["label"]), (t + 100.0, cond["label"]), (t, cond["label"] + 3)):
    out = np.asarray(model.apply({"params": params}, x, tt, {"label": label}))
    ref = numpy_dit.forward(host, fields, np.asarray(x), np.asarray(tt), {"label": label})
    # float32 vs float64 with weights 0.3 randn: measured <= 3e-5 of the largest output.
    np.testing.assert_allclose(out, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    outs.append(ref)
  assert np.abs(outs[0] - outs[1]).max() > 0.05 and np.abs(outs[0] - outs[2]).max() > 0.05


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_cfg_drop_uses_the_null_label(block):
  model = make(block)
  params = random_params(model)
  x, t, cond = inputs()
  dropped = model.apply({"params": params}, x, t, {**cond, "drop": jnp.array([True, False])})
  null = model.apply({"params": params}, x, t, {"label": jnp.array([CLASSES, 2])})
  np.testing.assert_allclose(dropped, null, atol=1e-6)


def test_in_context_condition_enters_through_attention_only():
  """With the attention values zeroed, nothing flows between tokens, so neither timestep nor
  label can change the output: the condition is not also injected some other way."""
  model = make("in_context")
  params = random_params(model)
  for i in range(DEPTH):
    v = params[f"blocks_{i}"]["attn"]
    name = next(k for k in v if "qkv" in k)
    kernel = v[name]["kernel"].reshape(D, 3, D)
    v[name]["kernel"] = kernel.at[:, 2].set(0.0).reshape(D, 3 * D)
    v[name]["bias"] = v[name]["bias"].reshape(3, D).at[2].set(0.0).reshape(3 * D)
  x, t, cond = inputs()
  a = model.apply({"params": params}, x, t, cond)
  b = model.apply({"params": params}, x, t + 100.0, {"label": cond["label"] + 3})
  np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("block", ["cross_attn", "in_context"])
def test_remat_gives_the_same_output(block):
  x, t, cond = inputs()
  params = random_params(make(block))
  a = make(block).apply({"params": params}, x, t, cond)
  b = make(block, remat=True).apply({"params": params}, x, t, cond)
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_info_counts_the_extra_tokens_and_cross_attention():
  """model_info's jaxpr count sees the 2 in-context tokens and the cross-attention matmuls."""
  macs = lambda c: model_info(make(c), train_flops=False)["gmacs_fwd"] * 1e9
  base, in_context, cross = macs("adaln_zero"), macs("in_context"), macs("cross_attn")
  n = (S // P) ** 2
  # adaLN-Zero per-block modulation: D x 6D; in-context: the qkv/proj/MLP over n + 2 tokens
  # and attention over (n + 2)^2 instead of n tokens and n^2.
  per_token = 4 * D * D + 8 * D * D  # qkv + proj, MLP (ratio 4)
  attn = lambda m: 2 * m * m * D  # scores + weighted sum
  block = lambda m: m * per_token + attn(m)
  expect_in_context = base - DEPTH * (6 * D * D) - 2 * D * D + DEPTH * (block(n + 2) - block(n))
  assert in_context == pytest.approx(expect_in_context, rel=1e-9)
  # Cross-attention: q and proj on n tokens, kv on 2 tokens, scores n x 2 and sum.
  cross_block = n * 2 * D * D + 2 * 2 * D * D + 2 * n * 2 * D
  expect_cross = base - DEPTH * (6 * D * D) - 2 * D * D + DEPTH * cross_block
  assert cross == pytest.approx(expect_cross, rel=1e-9)


def test_bad_block_is_an_error():
  x, t, cond = inputs()
  with pytest.raises(ValueError, match="block must be one of"):
    make("film").init(jax.random.key(0), x, t, cond)
  with pytest.raises(ValueError, match="block='in_context' takes no caption"):
    make("in_context", caption_channels=8).init(jax.random.key(0), x, t, cond)
  # The same combinations in a config written before `block` existed.
  with pytest.raises(ValueError, match="needs adaln='zero'"):
    build_model(dict(conditioning="in_context", adaln="single"))
  with pytest.raises(ValueError, match="conditioning must be one of"):
    build_model(dict(conditioning="film"))
