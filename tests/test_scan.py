"""Blocks run as one lax.scan (config.model.scan) and rematerialised (remat, remat_policy).

Scanned, rematerialised and plain unrolled models have the same params (names, init values)
and give the same outputs and gradients for every block type; the scanned model matches the
NumPy reference; stack_blocks / unstack_blocks are lossless and keep the block order; one
block is traced however deep the model; and remat saves memory in the compiled backward
pass, unrolled and scanned (it did not before: docs/performance.md).
"""

import sys
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import numpy_dit
import optax
import pytest

from dit.models import flops, repeat
from dit.models.dit import BLOCKS, DiT, example_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # For `benchmarks`.
from benchmarks import compile as compile_bench  # noqa: E402

# Depth 2: a wrong block order or a block run twice changes the result.
TINY = dict(input_size=4, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2)
CASES = {
  "adaln_zero_captions": dict(TINY, num_classes=10, block="adaln_zero", caption_channels=8),
  "adaln_single": dict(TINY, num_classes=0, block="adaln_single", caption_channels=8),
  "adaln": dict(TINY, num_classes=10, block="adaln"),
  "cross_attn": dict(TINY, num_classes=10, block="cross_attn"),
  "in_context": dict(TINY, num_classes=10, block="in_context", depth=1),  # A scan of length 1.
}
assert {f["block"] for f in CASES.values()} == set(BLOCKS)  # Every registered block type.
# float32 vs float32 with the same ops in another order: measured <= 6e-8 on outputs of O(1).
ATOL = 1e-6
# The CPU compiler without LLVM's expensive passes: compiles in about half the time (these
# tests compare programs, never time them).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _case(name):
  fields = dict(CASES[name], caption_length=3)
  model = DiT(**fields)
  x, t, cond = example_inputs(model, 2)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, cond)["params"]
  rng = np.random.default_rng(0)
  # Random values for every param (zero-init ones too), so every block's weights matter.
  params = jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), shapes)
  x = rng.standard_normal(x.shape).astype(np.float32)
  cond = dict(cond, label=np.array([1, 4]), drop=np.array([False, True]))
  if "text" in cond:
    cond["text"] = rng.standard_normal(cond["text"].shape).astype(np.float32)
    cond["text_mask"] = np.array([[1, 1, 0], [1, 1, 1]])
  return fields, model, params, x, np.array([3.0, 700.0], np.float32), cond


def _outputs_and_grads(model, variants, params, x, t, cond):
  """[(loss, output, grads)] of model.clone(**v) for each variant, one jit (one compile)."""

  def run(params):
    rows = []
    for v in variants:
      m = model.clone(**v)

      def loss(p, m=m):
        out = m.apply({"params": p}, x, t, cond)
        return jnp.mean(jnp.sin(out)), out  # sin: a gradient that differs per element.

      (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
      rows.append((value, out, grads))
    return rows

  return jax.jit(run).lower(params).compile(FAST_COMPILE)(params)


def _assert_same(got, want, what):
  (loss, out, grads), (loss0, out0, grads0) = got, want
  np.testing.assert_allclose(out, out0, atol=ATOL, rtol=0, err_msg=f"{what}: outputs")
  np.testing.assert_allclose(loss, loss0, atol=ATOL, rtol=0, err_msg=f"{what}: loss")
  assert jax.tree.structure(grads) == jax.tree.structure(grads0)  # The per-block layout.
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    g0 = grads0
    for key in path:
      g0 = g0[key.key]
    np.testing.assert_allclose(g, g0, atol=ATOL, rtol=1e-5, err_msg=f"{what}: {path}")


# Scanned with remat and a policy, for every block type; the remat of an unrolled stack
# (the other path) with a policy once (test_model.py checks it without one for the production
# types). The ways differ only in repeat_blocks, which every stack calls. Scanned without
# remat is the same forward, differentiated by JAX.
VARIANTS = {
  "adaln_zero_captions": [
    dict(scan=True, remat=True, remat_policy="dots_with_no_batch_dims_saveable"),
    dict(remat=True, remat_policy="dots_saveable"),
  ],
}
SCANNED = [dict(scan=True, remat=True, remat_policy="dots_with_no_batch_dims_saveable")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_scan_and_remat_match_unrolled(name):
  fields, model, params, x, t, cond = _case(name)
  variants = VARIANTS.get(name, SCANNED)
  rows = _outputs_and_grads(model, [{}, *variants], params, x, t, cond)
  grads = rows[0][2]
  # Every block's params get a gradient (none of them is skipped or run twice in its place).
  for i in range(fields["depth"]):
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[f"blocks_{i}"])) > 1e-4
  for v, row in zip(variants, rows[1:], strict=True):
    _assert_same(row, rows[0], f"{name} {v}")
  # And the scanned model is the NumPy reference's DiT, not only the unrolled one's twin.
  ref = numpy_dit.forward(jax.device_get(params), fields, x, t, cond)
  np.testing.assert_allclose(rows[1][1], ref, atol=2e-4, rtol=0)  # As test_model's REF_ATOL.
  assert np.abs(ref).max() > 0.1


def test_params_are_the_same_whichever_way_the_model_runs():
  """Init creates blocks_0 .. blocks_{n-1} with the same values, scanned, rematerialised or not,
  so a checkpoint, a converter's output or an old run loads into any of them: the init
  programs are the same jaxpr (the same random draws, in the same places)."""
  model = DiT(**CASES["adaln_single"], caption_length=3)
  inputs = example_inputs(model, 1)
  for v in (dict(scan=True), dict(scan=True, remat=True), dict(remat=True)):
    init = lambda m: jax.make_jaxpr(m.init)(jax.random.key(0), *inputs)
    assert str(init(model.clone(**v))) == str(init(model)), v
  shapes = jax.eval_shape(model.clone(scan=True).init, jax.random.key(0), *inputs)["params"]
  assert {"blocks_0", "blocks_1", "t_block_1"} <= set(shapes) and "blocks" not in shapes


def test_stack_unstack_round_trip_keeps_the_block_order():
  # 12 blocks: "blocks_10" sorts before "blocks_2" as a string; the order must be numeric.
  rng = np.random.default_rng(0)
  params = {
    f"blocks_{i}": {
      "attn": {"kernel": rng.standard_normal((3, 2)).astype(np.float32)},
      "bias": np.full(4, i, np.float32),
    }
    for i in range(12)
  }
  params["final_layer"] = {"kernel": np.ones((2, 2), np.float32)}
  stacked = repeat.stack_blocks(params)
  assert set(stacked) == {"blocks", "final_layer"}
  assert stacked["blocks"]["attn"]["kernel"].shape == (12, 3, 2)
  np.testing.assert_array_equal(stacked["blocks"]["bias"][:, 0], np.arange(12.0))
  for i in range(12):
    np.testing.assert_array_equal(
      stacked["blocks"]["attn"]["kernel"][i], params[f"blocks_{i}"]["attn"]["kernel"]
    )
  back = repeat.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)  # Lossless: bit for bit.
  # The boundary: one block; and a gap in the numbering is an error, not a silent reorder.
  one = repeat.stack_blocks({"blocks_0": {"w": np.ones(2)}})
  np.testing.assert_array_equal(one["blocks"]["w"], np.ones((1, 2)))
  with pytest.raises(ValueError, match=r"blocks_0 \.\. blocks_\{n-1\}, got blocks \[0, 2\]"):
    repeat.stack_blocks({"blocks_0": {"w": np.ones(2)}, "blocks_2": {"w": np.ones(2)}})


def test_one_block_is_traced_however_deep():
  """Scanned: the forward's jaxpr holds one block's matmuls at depth 2 and 6 (unrolled: 6 / 2
  times as many); the FLOP count (dit.models.flops) is the same either way."""

  def dots(model):
    jaxpr = jax.make_jaxpr(lambda p, *a: model.apply({"params": p}, *a))
    params = jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))["params"]
    text = str(jaxpr(params, *example_inputs(model)))
    return text.count("dot_general")

  fields = dict(TINY, num_classes=10)
  counts = {(d, s): dots(DiT(**dict(fields, depth=d, scan=s))) for d in (2, 6) for s in (0, 1)}
  per_block = (counts[6, 0] - counts[2, 0]) / 4
  assert per_block == 7  # adaLN, qkv, q k^T, p v, proj, fc1, fc2.
  assert counts[2, 1] == counts[6, 1] == counts[2, 0] - per_block
  model = DiT(**dict(fields, depth=2))
  assert flops.model_info(model.clone(scan=True)) == flops.model_info(model)


# Activation memory dominates this model (256 tokens, batch 8). Temporaries of the compiled
# backward pass, measured with jax 0.10.2 on the CPU: no remat 107.3 MiB; remat 37.2 MiB
# unrolled, 31.3 MiB scanned (before the fix, remat unrolled kept about 98%). One block's
# activations stay live however deep the model, a quarter of the no-remat figure at depth 4.
MEMORY = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=2)


def _temp_bytes(**fields):
  model = DiT(**MEMORY, num_classes=10, **fields)
  x, t, cond = example_inputs(model, 8)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, cond)["params"]
  grad = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, cond) ** 2))
  compiled = jax.jit(grad).lower(params).compile(FAST_COMPILE)
  return compiled.memory_analysis().temp_size_in_bytes


def test_remat_saves_memory_unrolled_and_scanned():
  """The fix: before it, remat left 98% of the backward pass's temporaries (XLA recomputed
  every block during the forward pass); now about a third, unrolled or scanned."""
  plain = _temp_bytes()
  assert _temp_bytes(remat=True) <= 0.5 * plain
  assert _temp_bytes(scan=True, remat=True) <= 0.5 * plain


def test_remat_policy_names():
  for name, policy in repeat.REMAT_POLICIES.items():
    assert (policy() is None) == (name == "")  # Every name resolves in this jax version.
  model = DiT(**TINY, num_classes=10)
  inputs = example_inputs(model)
  init = lambda m: jax.eval_shape(m.init, jax.random.key(0), *inputs)
  with pytest.raises(ValueError, match=r"remat_policy must be '' or one of \[.*'dots_saveable'"):
    init(model.clone(remat=True, remat_policy="dots"))
  # Without remat a policy is ignored (code that counts FLOPs turns remat off, not the policy).
  init(model.clone(remat_policy="offload_dot_with_no_batch_dims"))
  offload = dict(remat=True, remat_policy="offload_dot_with_no_batch_dims")
  with pytest.raises(ValueError, match="'offload_dot_with_no_batch_dims' needs scan=True"):
    init(model.clone(**offload))
  init(model.clone(**offload, scan=True))


# ---- The stacked layout: what the train state keeps with scan (dit/train.py) -------------


def test_stacked_params_give_the_unrolled_outputs_and_grads():
  """A scanned model takes the stacked layout as it is (no stacking in apply): outputs, and
  gradients that are the per-block ones stacked, match the unrolled model's with blocks_{i};
  the unrolled model takes the stacked layout too."""
  fields, model, params, x, t, cond = _case("adaln_zero_captions")
  stacked = repeat.stack_blocks(params)
  swapped = {**stacked, "blocks": jax.tree.map(lambda p: p[::-1], stacked["blocks"])}

  def run(m, p):
    loss = lambda p: jnp.mean(jnp.sin(m.apply({"params": p}, x, t, cond)))
    return jax.value_and_grad(loss)(p)

  def all_variants(params, stacked, swapped):
    rows = [run(model.clone(scan=True), stacked), run(model.clone(scan=True, remat=True), stacked)]
    rows.append(run(model, stacked))
    other = model.clone(scan=True).apply({"params": swapped}, x, t, cond)  # Forward only.
    return run(model, params), rows, jnp.mean(jnp.sin(other))

  args = (params, stacked, swapped)
  (loss0, grads0), rows, other = jax.jit(all_variants).lower(*args).compile(FAST_COMPILE)(*args)
  want = repeat.stack_blocks(grads0)
  for i, (loss, grads) in enumerate(rows):
    np.testing.assert_allclose(loss, loss0, atol=ATOL, rtol=0, err_msg=f"variant {i}")
    assert jax.tree.structure(grads) == jax.tree.structure(want)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(g, g0, atol=ATOL, rtol=1e-5, err_msg=f"variant {i}")
  assert abs(float(other) - float(loss0)) > 1e-4  # Row i of the stack is blocks_i.
  one = {**stacked, "blocks": jax.tree.map(lambda p: p[:1], stacked["blocks"])}
  with pytest.raises(
    ValueError, match=r"stacked params 'blocks' have \[1\] rows, expected depth=2"
  ):
    jax.eval_shape(lambda p: model.clone(scan=True).apply({"params": p}, x, t, cond), one)


def test_scanned_train_step_does_not_grow_with_depth():
  """The whole train step (loss, grads, AdamW, EMA, NaN guard) traces to the same program at
  depth 2 and 6 when scanned: the state is stacked, so no per-block stack, slice, optimizer
  or EMA op is left (before: 4056 -> 11616 equations for S/2 from depth 6 to 24)."""
  from conftest import tiny_config

  from dit import train

  def eqns(depth, scan):
    config = tiny_config(**{"model.depth": depth, "model.scan": scan, "parallelism": "mesh"})
    s = train.setup(config)
    size = config.model.input_size
    batch = {
      "image": jax.ShapeDtypeStruct((8, size, size, 1), jnp.float32),
      "label": jax.ShapeDtypeStruct((8,), jnp.int32),
    }
    return compile_bench.jaxpr_eqns(s.step.trace(s.abstract_state, batch, s.frozen).jaxpr.jaxpr)

  assert eqns(2, True) == eqns(6, True)


# ---- Joint streams: a tuple carry, two named stacks in one module -------------------------


class _Settings(NamedTuple):
  depth: int
  scan: bool = False
  remat: bool = False
  remat_policy: str = ""

  def block_fields(self):
    return {}


class _TwoStream(nn.Module):
  """(x (B, N, D), y (B, L, D)), c (B, D) -> the same: each stream mixes in the other's mean."""

  @nn.compact
  def __call__(self, tokens, c):
    x, y = tokens
    d = x.shape[-1]
    x = x + jnp.tanh(nn.Dense(d, name="x")(x) + y.mean(1, keepdims=True) + c[:, None])
    y = y + jnp.tanh(nn.Dense(d, name="y")(y) - x.mean(1, keepdims=True))
    return x, y


class _OneStream(nn.Module):
  @nn.compact
  def __call__(self, x, c):
    return x + jnp.sin(nn.Dense(x.shape[-1], name="fc")(x) * c[:, None])


class _Toy(nn.Module):
  """3 two-stream blocks (double_blocks_{i}), then 2 on the joined sequence (single_blocks_{i})."""

  scan: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x, y, c):
    run = dict(scan=self.scan, remat=self.remat, remat_policy="")
    x, y = repeat.repeat_blocks(_TwoStream, _Settings(3, **run), (x, y), c, prefix="double_blocks")
    z = jnp.concatenate([x, y], axis=1)
    return repeat.repeat_blocks(_OneStream, _Settings(2, **run), z, c, prefix="single_blocks")


def test_tuple_carry_and_named_stacks():
  rng = np.random.default_rng(0)
  x, y, c = (rng.standard_normal(s).astype(np.float32) for s in ((2, 4, 8), (2, 3, 8), (2, 8)))
  model = _Toy()
  params = model.init(jax.random.key(0), x, y, c)["params"]
  names = [f"double_blocks_{i}" for i in range(3)] + ["single_blocks_0", "single_blocks_1"]
  assert sorted(params) == names
  assert repeat.find_stacks(model, x, y, c) == (
    repeat.Stack((), "double_blocks", 3),
    repeat.Stack((), "single_blocks", 2),
  )
  stacks = repeat.find_stacks(model, x, y, c)
  stacked = repeat.stack_tree(params, stacks)
  assert sorted(stacked) == ["double_blocks", "single_blocks"]
  assert stacked["double_blocks"]["x"]["kernel"].shape == (3, 8, 8)
  jax.tree.map(np.testing.assert_array_equal, repeat.unstack_tree(stacked, stacks), params)

  variants = [
    (dict(scan=True), False),
    (dict(remat=True), False),
    (dict(scan=True, remat=True), False),
    (dict(scan=True, remat=True), True),
    (dict(), True),
  ]

  def run_all(params, stacked):
    def run(m, p):
      return jax.value_and_grad(lambda p: jnp.mean(jnp.cos(m.apply({"params": p}, x, y, c))))(p)

    return run(model, params), [
      run(model.clone(**f), stacked if s else params) for f, s in variants
    ]

  args = (params, stacked)
  (loss0, grads0), rows = jax.jit(run_all).lower(*args).compile(FAST_COMPILE)(*args)
  for (fields, is_stacked), (loss, grads) in zip(variants, rows, strict=True):
    np.testing.assert_allclose(loss, loss0, atol=ATOL, rtol=0, err_msg=str(fields))
    if is_stacked:
      grads = repeat.unstack_tree(grads, stacks)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
      np.testing.assert_allclose(g, g0, atol=ATOL, rtol=1e-5, err_msg=str(fields))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0["double_blocks_2"])) > 1e-3


def test_stack_tree_converts_a_train_state():
  """Params, EMA and every optimizer moment are converted, the rest kept; a stack of fewer
  blocks than the model names (MMDiT runs its last block on its own) leaves the others."""
  rng = np.random.default_rng(0)
  block = lambda: {"w": rng.standard_normal((2, 3)).astype(np.float32)}
  params = {"blocks_0": block(), "blocks_1": block(), "blocks_2": {"v": np.ones(2, np.float32)}}
  params["head"] = {"w": np.ones(3, np.float32)}
  tx = optax.adamw(1e-3)
  state = {"step": 0, "params": params, "ema_params": params, "opt_state": tx.init(params)}
  stacks = (repeat.Stack((), "blocks", 2),)
  stacked = repeat.stack_tree(state, stacks)
  for tree in (stacked["params"], stacked["ema_params"], stacked["opt_state"][0].mu):
    assert sorted(tree) == ["blocks", "blocks_2", "head"]
    assert tree["blocks"]["w"].shape == (2, 2, 3)
  assert jax.tree.structure(stacked["opt_state"]) == jax.tree.structure(tx.init(stacked["params"]))
  back = repeat.unstack_tree(stacked, stacks)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, back, state)
  with pytest.raises(ValueError, match=r"blocks_0 \.\. blocks_\{n-1\} with n = 4, got blocks"):
    repeat.stack_blocks(params, depth=4)
