"""Devices, meshes and sharding: the helpers behind the train loop's two paths.

- "pmap": data parallel over local devices; arrays carry a leading device axis.
- "mesh": `jax.jit` over a `Mesh` with axes ("data", "fsdp", "tensor"). Parameters and
  optimizer state are sharded by `param_sharding` (FSDP over the largest divisible
  dimension, tensor parallel by name rules), the batch over ("data", "fsdp").

Multi-host: `initialize_distributed()` then every process runs the same program; each
feeds its own shard of the global batch (`global_batch`).
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Tensor-parallel rules, matched against "/"-joined parameter paths: (regex, dim to
# shard over "tensor"). Column-parallel into-MLP/QKV, row-parallel out of them.
TENSOR_RULES = (
  (r"(mlp|ffn).*(fc1|wi|in_proj|Dense_0)/kernel$", 1),
  (r"(mlp|ffn).*(fc2|wo|out_proj|Dense_1)/kernel$", 0),
  (r"attn.*(qkv|query|key|value|q_proj|k_proj|v_proj|kv)/kernel$", -1),
  (r"attn.*(proj|out|o_proj)/kernel$", 0),
)


def initialize_distributed() -> None:
  """Starts multi-host JAX from the environment (TPU pods, SLURM, or explicit vars).

  Explicit setup: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
  """
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or jax.config.jax_platforms == "cpu":
    # The CPU backend needs a collectives implementation for cross-process reductions.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    jax.distributed.initialize(
      address,
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  else:
    jax.distributed.initialize()


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Builds a ("data", "fsdp", "tensor") mesh; one axis may be -1 (all the rest)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  shape = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(
      f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape, strict=True))}."
    )
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if devices.size % known:
      raise ValueError(
        f"Mesh {dict(zip(MESH_AXES, shape, strict=True))} does not divide the "
        f"{devices.size} devices."
      )
    shape[shape.index(-1)] = devices.size // known
  if int(np.prod(shape)) != devices.size or min(shape) < 1:
    raise ValueError(
      f"Mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs {int(np.prod(shape))} devices, "
      f"but {devices.size} are available."
    )
  return Mesh(devices.reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, min_fsdp_size: int = 2**14) -> P:
  """PartitionSpec of one parameter: tensor rules by name, then FSDP on the largest dim."""
  spec: list = [None] * len(shape)
  tensor = mesh.shape["tensor"]
  if tensor > 1:
    for pattern, dim in TENSOR_RULES:
      if re.search(pattern, path) and len(shape) >= 2 and shape[dim] % tensor == 0:
        spec[dim] = "tensor"
        break
  fsdp = mesh.shape["fsdp"]
  if fsdp > 1 and int(np.prod(shape)) >= min_fsdp_size:
    free = [d for d in np.argsort(shape)[::-1] if spec[d] is None and shape[d] % fsdp == 0]
    if free:
      spec[int(free[0])] = "fsdp"
  return P(*spec)


def state_sharding(abstract_state, mesh: Mesh):
  """NamedShardings for a pytree of arrays (params, EMA, optimizer state alike)."""

  def leaf(path, x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, param_spec(_path_str(path), shape, mesh))

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles each process's batch shard into global arrays with `sharding`."""
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


# ---- pmap path ----------------------------------------------------------------


def replicate(tree):
  """Stacks a pytree along a new leading axis of size `jax.local_device_count()`."""
  n = jax.local_device_count()
  return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n, *jnp.shape(x))), tree)


def unreplicate(tree):
  return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch: dict) -> dict:
  """(B_local, ...) -> (local_devices, B_local / local_devices, ...)."""
  n = jax.local_device_count()

  def split(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(f"Per-process batch {x.shape[0]} is not divisible by {n} local devices.")
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])

  return jax.tree.map(split, batch)
