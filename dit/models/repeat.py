"""How a stack of blocks runs: unrolled, scanned (one lax.scan over stacked params), remat.

Every block type's stack calls `repeat_blocks`; so scan and remat work the same for all of
them, and the saved param layout is per block (blocks_{i}) whichever way the model runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from dit.models.blocks import BlockSettings


# config.model.remat_policy -> what the backward pass keeps of each block's forward ("" keeps
# only the block's inputs). The offload policy moves the kept matmul outputs to host memory.
REMAT_POLICIES = {
  "": lambda: None,
  "nothing_saveable": lambda: jax.checkpoint_policies.nothing_saveable,
  "everything_saveable": lambda: jax.checkpoint_policies.everything_saveable,
  "dots_saveable": lambda: jax.checkpoint_policies.dots_saveable,
  "checkpoint_dots": lambda: jax.checkpoint_policies.checkpoint_dots,
  "dots_with_no_batch_dims_saveable": (
    lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  ),
  "checkpoint_dots_with_no_batch_dims": (
    lambda: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  ),
  "offload_dot_with_no_batch_dims": (
    lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  ),
}

_BLOCK_NAME = re.compile(r"blocks_(\d+)")


def stack_blocks(params: dict) -> dict:
  """Per-block params {"blocks_0": p_0, ..., "blocks_{n-1}": p_{n-1}, ...} -> the scanned layout
  {"blocks": tree of (n, ...) arrays, row i = p_i, ...}; the other entries are kept as they are.

  The saved layout is always the per-block one (converters, old checkpoints, sampling read
  it); `repeat_blocks` stacks inside the model's apply, so this is only needed by code that
  wants the scanned layout itself. Lossless: unstack_blocks(stack_blocks(p)) == p.
  """
  index = sorted(int(m.group(1)) for k in params if (m := _BLOCK_NAME.fullmatch(k)))
  if index != list(range(len(index))) or not index:
    raise ValueError(f"expected params blocks_0 .. blocks_{{n-1}}, got blocks {index}")
  if "blocks" in params:
    raise ValueError("params already have a 'blocks' entry (the stacked layout)")
  per_block = [params[f"blocks_{i}"] for i in index]
  rest = {k: v for k, v in params.items() if not _BLOCK_NAME.fullmatch(k)}
  return {**rest, "blocks": jax.tree.map(lambda *p: jnp.stack(p), *per_block)}


def unstack_blocks(params: dict) -> dict:
  """The inverse of stack_blocks: {"blocks": (n, ...) arrays, ...} -> blocks_0 .. blocks_{n-1}."""
  stacked = params["blocks"]
  (n,) = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
  rest = {k: v for k, v in params.items() if k != "blocks"}
  return {**rest, **{f"blocks_{i}": jax.tree.map(lambda p, i=i: p[i], stacked) for i in range(n)}}


def repeat_blocks(
  block_cls: type[nn.Module],
  settings: BlockSettings,
  tokens: jax.Array,
  *args: Any,
  **fields: Any,
) -> jax.Array:
  """Runs blocks_0 .. blocks_{depth-1}, each block_cls(**fields) called (tokens, *args).

  At init, and with neither settings.scan nor settings.remat, the blocks are child modules
  blocks_{i} of the caller, called in turn: so the params, their names and their initial
  values are the same whichever way the model runs. Otherwise each block's params are read
  back from blocks_{i} and one pure block function runs them: in a lax.scan over the
  stacked params (scan; one block traced and compiled instead of depth), checkpointed
  with the named REMAT_POLICIES policy (remat). The checkpoint layout stays per block.
  """
  kwargs = {**settings.block_fields(), **fields}
  blocks = [block_cls(**kwargs, name=f"blocks_{i}") for i in range(settings.depth)]
  if not blocks or blocks[0].is_initializing() or not (settings.scan or settings.remat):
    for block in blocks:
      tokens = block(tokens, *args)
    return tokens
  apply = block_cls(**kwargs, parent=None).apply  # Unbound: a pure function of its params.
  fn = lambda params, x, *args: apply({"params": params}, x, *args)
  params = [block.variables["params"] for block in blocks]
  policy = REMAT_POLICIES[settings.remat_policy]()
  if settings.scan:
    return scan_blocks(fn, params, tokens, args, remat=settings.remat, policy=policy)
  for p in params:
    tokens = remat_in_order(fn, policy)(p, tokens, *args)
  return tokens


def scan_blocks(
  fn: Callable, params: Sequence[dict], x: jax.Array, args: tuple, *, remat: bool, policy
) -> jax.Array:
  """x -> fn(params[-1], ... fn(params[0], x, *args) ..., *args) as one lax.scan.

  With remat the backward pass is a loop too: each step recomputes one block's forward and
  runs its backward, so one block's activations are live at a time (plus each block's input
  and what the policy keeps).
  """
  stacked = stack_blocks({f"blocks_{i}": p for i, p in enumerate(params)})["blocks"]

  def body(x, p):
    return fn(p, x, *args), None

  if remat:
    # No CSE barrier needed: inside a loop body the recomputation cannot be merged with the
    # forward (jax.checkpoint's documented advice for scan).
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  return jax.lax.scan(body, x, stacked)[0]


def remat_in_order(fn: Callable, policy) -> Callable:
  """jax.checkpoint(fn, policy) whose recomputation cannot start before its output's cotangent.

  Why: in an unrolled stack nothing orders block i's recomputation after the backward pass
  of blocks i+1 ..; XLA then schedules every recomputation early, in the forward pass, and
  all activations are live at once: remat saved 2% of an S/2 gradient's temporaries (see
  docs/performance.md). Here the backward pass adds 0 * (an element of the cotangent) to
  the kept residuals, a data dependency that XLA keeps (an optimization barrier would not
  survive: the CPU compiler removes them before scheduling). A finite cotangent changes
  nothing; a non-finite one makes the gradient non-finite anyway.
  fn(params, x, *args) -> (B, N, D); the result takes and returns the same.
  """
  checkpointed = jax.checkpoint(fn, policy=policy)

  @jax.custom_vjp
  def run(*inputs):
    return fn(*inputs)

  def forward(*inputs):
    return jax.vjp(checkpointed, *inputs)  # (out, vjp): vjp is a pytree of the residuals.

  def backward(vjp, g):
    zero = 0 * jax.lax.stop_gradient(g.reshape(-1)[0])
    leaves, tree = jax.tree.flatten(vjp)
    tie = lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.inexact) else r
    return jax.tree.unflatten(tree, [tie(r) for r in leaves])(g)

  run.defvjp(forward, backward)
  return run
