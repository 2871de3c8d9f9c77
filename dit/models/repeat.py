"""How a stack of blocks runs: unrolled, scanned (one lax.scan over stacked params), remat.

Every block type's stack calls `repeat_blocks`; so scan and remat work the same for all of
them. Two param layouts, converted losslessly into each other:
  per block  <path>/<prefix>_{i}: what init builds and checkpoints, converters and sampling
             read, whichever way the model runs;
  stacked    <path>/<prefix>: one tree of (depth, ...) arrays, row i = block i: what the
             scanned model scans over directly. The train state keeps this layout with
             config.model.scan (dit/train.py), so no apply stacks or slices the block params.
`repeat_blocks` reads either (the stacked one when it is there). `find_stacks` says where a
model's stacks are; `stack_tree` / `unstack_tree` convert every params-like dict of a pytree
(params, EMA, each optimizer moment) between the layouts.

The tokens carried through a stack are one array (B, N, D) or a tuple of them (joint
text/image streams: (image tokens, text tokens)); a block takes them as its first argument
and returns the same structure.

`capturing(k)` keeps the tokens after block k of the stack run inside it (REPA aligns that
hidden state): the stack then runs as blocks 1..k and k+1..depth, scanned or not.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

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

Tokens = Any  # One array (B, N, D) or a tuple of arrays, carried through the blocks.


class Stack(NamedTuple):
  """One stack that repeat_blocks runs: per-block params <path>/<prefix>_{i}, i < depth."""

  path: tuple[str, ...]  # Of the module that calls repeat_blocks; () = the model itself.
  prefix: str
  depth: int


_FOUND: contextvars.ContextVar[list[Stack] | None] = contextvars.ContextVar(
  "dit_repeat_stacks", default=None
)


_CAPTURE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
  "dit_repeat_capture", default=None
)


@contextlib.contextmanager
def capturing(after: int) -> Iterator[dict]:
  """Inside, the first repeat_blocks call stores its tokens after block `after` (1-based, in
  [1, depth]) as box["tokens"]; yields the box.

  A context rather than another return value, so that every block type's stack function
  keeps its signature (tokens in, tokens out).
  """
  box: dict = {"after": after}
  token = _CAPTURE.set(box)
  try:
    yield box
  finally:
    _CAPTURE.reset(token)


def _capture_index(depth: int) -> tuple[dict | None, int]:
  """(box, k) of the innermost `capturing` not yet filled, else (None, 0)."""
  box = _CAPTURE.get()
  if box is None or "tokens" in box:
    return None, 0
  if not 1 <= box["after"] <= depth:
    raise ValueError(f"cannot capture the tokens after block {box['after']}: depth is {depth}")
  return box, box["after"]


# ---- Layouts ------------------------------------------------------------------------------


def _block_index(params: dict, prefix: str) -> list[int]:
  name = re.compile(re.escape(prefix) + r"_(\d+)")
  return sorted(int(m.group(1)) for k in params if (m := name.fullmatch(k)))


def stack_blocks(
  params: dict, prefix: str = "blocks", depth: int | None = None, *, stack: Callable = jnp.stack
) -> dict:
  """Per-block params {"<prefix>_0": p_0, ..., "<prefix>_{n-1}": p_{n-1}, ...} -> the stacked
  layout {"<prefix>": tree of (n, ...) arrays, row i = p_i, ...}; other entries are kept.

  depth: stack <prefix>_0 .. <prefix>_{depth-1} only (a model may run more blocks of that
  name on their own, e.g. MMDiT's last block); None: all, which must be numbered 0 .. n-1.
  stack: [n leaves] -> one leaf (jnp.stack; e.g. shardings gain a leading axis instead).
  Lossless: unstack_blocks(stack_blocks(p, prefix), prefix) == p.
  """
  index = _block_index(params, prefix)
  wanted = list(range(len(index) if depth is None else depth))
  if not wanted or index[: len(wanted)] != wanted:
    raise ValueError(
      f"expected params {prefix}_0 .. {prefix}_{{n-1}}"
      + ("" if depth is None else f" with n = {depth}")
      + f", got {prefix} {index}"
    )
  if prefix in params:
    raise ValueError(f"params already have a {prefix!r} entry (the stacked layout)")
  names = [f"{prefix}_{i}" for i in wanted]
  rest = {k: v for k, v in params.items() if k not in names}
  return {**rest, prefix: jax.tree.map(lambda *p: stack(p), *[params[k] for k in names])}


def unstack_blocks(params: dict, prefix: str = "blocks") -> dict:
  """The inverse of stack_blocks: {"<prefix>": (n, ...) arrays, ...} -> <prefix>_0 .. _{n-1}."""
  if prefix not in params:
    raise ValueError(f"expected a stacked {prefix!r} entry, got keys {sorted(params)}")
  stacked = params[prefix]
  (n,) = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
  rest = {k: v for k, v in params.items() if k != prefix}
  blocks = {f"{prefix}_{i}": jax.tree.map(lambda p, i=i: p[i], stacked) for i in range(n)}
  return {**rest, **blocks}


@contextlib.contextmanager
def recording() -> Iterator[list[Stack]]:
  """Collects the Stack of every repeat_blocks call traced inside (init included)."""
  found: list[Stack] = []
  token = _FOUND.set(found)
  try:
    yield found
  finally:
    _FOUND.reset(token)


def find_stacks(model: nn.Module, *inputs: Any) -> tuple[Stack, ...]:
  """The stacks `model` runs with repeat_blocks, from an abstract init on `inputs` (nothing is
  allocated), in the order they run."""
  with recording() as found:
    # A new function each call, so that no trace cache skips the Python that records.
    jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
  return tuple(dict.fromkeys(found))


def _at(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _replaced(tree: dict, path: tuple[str, ...], fn: Callable[[dict], dict]) -> dict:
  if not path:
    return fn(tree)
  return {**tree, path[0]: _replaced(tree[path[0]], path[1:], fn)}


def _convert(tree: Any, stacks: Sequence[Stack], key: Callable[[Stack], str], fn) -> Any:
  """fn(params-like dict, stack) for each stack, applied to every dict of `tree` that holds
  key(stack) under stack.path for all stacks (params, EMA and optimizer moments alike)."""
  if not stacks:
    return tree

  def is_params(x) -> bool:
    return isinstance(x, dict) and all(
      isinstance(d := _at(x, s.path), dict) and key(s) in d for s in stacks
    )

  def convert(x):
    if not is_params(x):
      return x
    for s in stacks:
      x = _replaced(x, s.path, lambda d, s=s: fn(d, s))
    return x

  return jax.tree.map(convert, tree, is_leaf=is_params)


def stack_tree(tree: Any, stacks: Sequence[Stack], *, stack: Callable = jnp.stack) -> Any:
  """Every params-like dict of `tree` (a train state: params, EMA, optimizer state) from the
  per-block layout to the stacked one, for each of `stacks` (find_stacks)."""
  return _convert(
    tree,
    stacks,
    lambda s: f"{s.prefix}_0",
    lambda d, s: stack_blocks(d, s.prefix, s.depth, stack=stack),
  )


def unstack_tree(tree: Any, stacks: Sequence[Stack]) -> Any:
  """The inverse of stack_tree: the stacked layout -> per block, for each of `stacks`."""
  return _convert(tree, stacks, lambda s: s.prefix, lambda d, s: unstack_blocks(d, s.prefix))


# ---- Running the blocks -------------------------------------------------------------------


def repeat_blocks(
  block_cls: type[nn.Module],
  settings: Any,  # dit.models.blocks.BlockSettings (depth, scan, remat, remat_policy, ...).
  tokens: Tokens,
  *args: Any,
  prefix: str = "blocks",
  **fields: Any,
) -> Tokens:
  """Runs <prefix>_0 .. <prefix>_{depth-1}, each block_cls(**fields) called (tokens, *args).

  tokens: (B, N, D), or a tuple of arrays that each block takes and returns (joint streams).
  prefix: the children's names (two stacks in one module need two prefixes).
  At init, and with neither settings.scan nor settings.remat, the blocks are child modules
  <prefix>_{i} of the caller, called in turn: so the params, their names and their initial
  values are the same whichever way the model runs. Otherwise one pure block function runs
  each block's params: in a lax.scan over the stacked params (scan; one block traced and
  compiled instead of depth), checkpointed with the named REMAT_POLICIES policy (remat).
  Outside init the params may also come stacked, as the caller's <prefix> entry (see the
  module docstring); a scanned model then scans them as they are. Inside `capturing(k)` the
  tokens after block k are kept too (a scanned stack runs as two scans, 1..k and k+1..).
  """
  kwargs = {**settings.block_fields(), **fields}
  blocks = [block_cls(**kwargs, name=f"{prefix}_{i}") for i in range(settings.depth)]
  if not blocks:
    return tokens
  box, capture = _capture_index(settings.depth)
  initializing = blocks[0].is_initializing()
  if initializing and (found := _FOUND.get()) is not None:
    found.append(Stack(tuple(blocks[0].parent.path), prefix, settings.depth))
  stacked = None
  if not initializing:  # Unbound until read: an absent entry reads as no variables.
    stacked = block_cls(**kwargs, name=prefix).variables.get("params")
  if stacked is None and (initializing or not (settings.scan or settings.remat)):
    for i, block in enumerate(blocks):
      tokens = block(tokens, *args)
      if i + 1 == capture:
        box["tokens"] = tokens
    return tokens
  apply = block_cls(**kwargs, parent=None).apply  # Unbound: a pure function of its params.
  fn = lambda params, x, *args: apply({"params": params}, x, *args)
  policy = REMAT_POLICIES[settings.remat_policy]()
  if stacked is not None:
    depths = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    if depths != {settings.depth}:
      raise ValueError(
        f"stacked params {prefix!r} have {sorted(depths)} rows, expected depth={settings.depth}"
      )
    params = stacked
  else:
    params = [block.variables["params"] for block in blocks]
  if settings.scan:
    run = lambda p, x: scan_blocks(fn, p, x, args, remat=settings.remat, policy=policy)
    if not capture:
      return run(params, tokens)
    if stacked is not None:
      first = jax.tree.map(lambda p: p[:capture], params)
      rest = jax.tree.map(lambda p: p[capture:], params)
    else:
      first, rest = params[:capture], params[capture:]
    box["tokens"] = tokens = run(first, tokens)
    return run(rest, tokens) if capture < settings.depth else tokens
  if stacked is not None:
    params = [jax.tree.map(lambda p, i=i: p[i], stacked) for i in range(settings.depth)]
  step = remat_in_order(fn, policy) if settings.remat else fn
  for i, p in enumerate(params):
    tokens = step(p, tokens, *args)
    if i + 1 == capture:
      box["tokens"] = tokens
  return tokens


def scan_blocks(
  fn: Callable, params: dict | Sequence[dict], x: Tokens, args: tuple, *, remat: bool, policy
) -> Tokens:
  """x -> fn(params[-1], ... fn(params[0], x, *args) ..., *args) as one lax.scan.

  params: the stacked block params (a tree of (depth, ...) arrays), or a sequence of per-block
  trees (stacked here, inside the traced program). x: an array or a tuple of arrays.
  With remat the backward pass is a loop too: each step recomputes one block's forward and
  runs its backward, so one block's activations are live at a time (plus each block's input
  and what the policy keeps).
  """
  if isinstance(params, (list, tuple)):
    params = stack_blocks({f"blocks_{i}": p for i, p in enumerate(params)})["blocks"]

  def body(x, p):
    return fn(p, x, *args), None

  if remat:
    # No CSE barrier needed: inside a loop body the recomputation cannot be merged with the
    # forward (jax.checkpoint's documented advice for scan).
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  return jax.lax.scan(body, x, params)[0]


def remat_in_order(fn: Callable, policy) -> Callable:
  """jax.checkpoint(fn, policy) whose recomputation cannot start before its output's cotangent.

  Why: in an unrolled stack nothing orders block i's recomputation after the backward pass
  of blocks i+1 ..; XLA then schedules every recomputation early, in the forward pass, and
  all activations are live at once: remat saved 2% of an S/2 gradient's temporaries (see
  docs/performance.md). Here the backward pass adds 0 * (an element of the cotangent) to
  the kept residuals, a data dependency that XLA keeps (an optimization barrier would not
  survive: the CPU compiler removes them before scheduling). A finite cotangent changes
  nothing; a non-finite one makes the gradient non-finite anyway.
  fn(params, x, *args) -> x's structure (an array (B, N, D) or a tuple of arrays); the
  result takes and returns the same.
  """
  checkpointed = jax.checkpoint(fn, policy=policy)

  @jax.custom_vjp
  def run(*inputs):
    return fn(*inputs)

  def forward(*inputs):
    return jax.vjp(checkpointed, *inputs)  # (out, vjp): vjp is a pytree of the residuals.

  def backward(vjp, g):
    zero = 0 * jax.lax.stop_gradient(jax.tree.leaves(g)[0].reshape(-1)[0])
    leaves, tree = jax.tree.flatten(vjp)
    tie = lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.inexact) else r
    return jax.tree.unflatten(tree, [tie(r) for r in leaves])(g)

  run.defvjp(forward, backward)
  return run
