"""Parameter count and FLOPs of a model, without allocating or running it (library code).

MACs are counted from the jaxpr (every dot_general and convolution, including those of
attention), so they follow the model code, not a hand formula: every block option counts as it
runs (SwiGLU's three matmuls, fc1's gate and value fused, and fc2; QK-norm and RMSNorm are
elementwise). Elementwise work is not counted: norms, activations, softmax, and RoPE's
rotation of q and k (per token and channel 6 FLOPs, against 2 N for one of attention's two
N-token matmuls: 3 / N of it, about 1% at N = 256 tokens). `python -m dit.info` prints
`model_info` for a config; the train loop and experiments import it from here.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dit.models.dit import DiT, example_inputs


def _dot_macs(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  batch = math.prod(lhs[i] for i in lb)
  contract = math.prod(lhs[i] for i in lc)
  lhs_free = math.prod(d for i, d in enumerate(lhs) if i not in (*lc, *lb))
  rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in (*rc, *rb))
  return batch * contract * lhs_free * rhs_free


def _conv_macs(eqn) -> int:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  out_feature = out[dn.out_spec[1]]
  # Each output element takes prod(kernel) / out_features MACs (in_features/groups * window).
  return math.prod(out) * math.prod(rhs) // out_feature // eqn.params["batch_group_count"]


def count_macs(jaxpr: Any) -> int:
  """Multiply-accumulates of every dot_general / conv in a (closed) jaxpr, sub-jaxprs included.

  A scan's body counts `length` times; other sub-jaxprs (pjit, remat, cond branches) once each.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_macs(eqn)
    elif name == "conv_general_dilated":
      total += _conv_macs(eqn)
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
          total += times * count_macs(sub)
  return total


def fixed_params(model: DiT) -> int:
  """The position tables' values at the training grid: sin-cos (N, D) and/or RoPE 2 x (N, Dh)."""
  tokens = (model.input_size // model.patch_size) ** 2
  pos_embed = getattr(model, "pos_embed", "sincos")
  table = tokens * model.hidden_size if pos_embed in ("sincos", "both") else 0
  rope = 2 * tokens * model.hidden_size // model.num_heads if pos_embed in ("rope", "both") else 0
  return table + rope


def model_info(model: DiT, train_flops: bool = True) -> dict[str, Any]:
  """Counts for one image at the model's training resolution (abstract evaluation only).

  Returns a JSON-able dict:
    params         trainable parameters (float32 values in the param tree)
    fixed_params   non-trainable values recomputed each call: the sin-cos position table
                   (tokens x D) and RoPE's cos and sin (2 x tokens x head_dim)
    gmacs_fwd      multiply-accumulates of one image's forward pass, in 1e9 (the DiT paper's
                   "Gflops", which count a multiply-add once); matmuls and convolutions only
    gflops_fwd     2 * gmacs_fwd
    gflops_train   (with train_flops) FLOPs of one image's forward + backward w.r.t. params,
                   a multiply-add = 2
    tokens, input_shape [1, H, W, C], output_shape [1, H, W, C_out], dtype

  One trace of `init_with_output` gives both the param shapes and the forward MACs
  (initialisers draw random numbers but do no matmuls); train_flops adds a trace of the grad.
  """
  x, t, cond = example_inputs(model, batch_size=1)

  def init_and_forward():
    return model.init_with_output(jax.random.key(0), x, t, cond)

  closed = jax.make_jaxpr(init_and_forward, return_shape=True)
  jaxpr, (out, variables) = closed()
  params = variables["params"]
  macs_fwd = count_macs(jaxpr)
  grid = model.input_size // model.patch_size
  info = {
    "params": int(sum(math.prod(p.shape) for p in jax.tree.leaves(params))),
    "fixed_params": fixed_params(model),
    "gmacs_fwd": macs_fwd / 1e9,
    "gflops_fwd": 2 * macs_fwd / 1e9,
    "tokens": grid * grid,
    "input_shape": list(x.shape),
    "output_shape": list(out.shape),
    "dtype": str(np.dtype(model.dtype)),
  }
  if train_flops:

    def loss(params):
      return jnp.mean(model.apply({"params": params}, x, t, cond) ** 2)

    info["gflops_train"] = 2 * count_macs(jax.make_jaxpr(jax.grad(loss))(params)) / 1e9
  return info
