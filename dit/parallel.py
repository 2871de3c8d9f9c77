"""Devices, meshes and sharding: the helpers behind the train loop's two paths.

- "pmap": data parallel; the state carries a leading device axis (`stack_for_pmap`),
  each device gets B / devices rows of the global batch (`pmap_batch`).
- "mesh": `jax.jit` over a `Mesh` with axes ("data", "fsdp", "tensor"). Parameters and
  optimizer state are sharded by `state_sharding` (tensor parallel by name rules, then FSDP
  over the largest divisible dimension), the batch over ("data", "fsdp").

Multi-host: `initialize_distributed()` then every process runs the same program; each
feeds its own rows of the global batch (`global_batch`, `pmap_batch`). The devices of a
mesh are in `jax.devices()` order, process by process, so process i holds rows
[i * B / P, (i + 1) * B / P) of every global batch, as the input pipeline reads them.
"""

from __future__ import annotations

import functools
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


def path_str(path) -> str:
  """ "/"-joined keys of a pytree path: ("params", "blocks_0", "attn", "qkv", "kernel")."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_spec(path: str, shape: tuple[int, ...], mesh, min_fsdp_size: int = 2**14) -> P:
  """PartitionSpec of one array: tensor rules by name, then FSDP on the largest free dim.

  Arrays smaller than `min_fsdp_size` elements stay replicated over "fsdp" (sharding them
  would cost more in collectives than it saves in memory).
  """
  spec: list = [None] * len(shape)
  tensor = mesh.shape["tensor"]
  if tensor > 1:
    for pattern, dim in TENSOR_RULES:
      if re.search(pattern, path) and len(shape) >= 2 and shape[dim] % tensor == 0:
        spec[dim] = "tensor"
        break
  fsdp = mesh.shape["fsdp"]
  if fsdp > 1 and int(np.prod(shape)) >= min_fsdp_size:
    by_size = np.argsort(shape, stable=True)[::-1]
    free = [d for d in by_size if spec[d] is None and shape[d] % fsdp == 0]
    if free:
      spec[int(free[0])] = "fsdp"
  return P(*spec)


def state_sharding(abstract_state, mesh: Mesh, min_fsdp_size: int = 2**14):
  """NamedShardings for a pytree of arrays (params, EMA, optimizer state alike)."""

  def leaf(path, x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, param_spec(path_str(path), shape, mesh, min_fsdp_size))

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles each process's batch rows into global arrays with `sharding`."""
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


@functools.partial(jax.jit, static_argnums=1)
def gather(tree, mesh: Mesh):
  """The same arrays, replicated on every device of `mesh` (an all-gather of shards)."""
  return jax.lax.with_sharding_constraint(tree, replicated(mesh))


def local_copy(tree):
  """Replicated global arrays -> their copy on this process's first device (no transfer)."""
  return jax.tree.map(lambda x: x.addressable_data(0), tree)


def first_value(x) -> np.ndarray:
  """Host value of a replicated array (or of row 0 of a pmap output), without collectives."""
  x = x.addressable_data(0) if isinstance(x, jax.Array) else x
  value = np.asarray(x)
  return value.reshape(-1)[0] if value.size == 1 or value.ndim == 0 else value


# ---- pmap path ----------------------------------------------------------------
# The pmap step takes and returns arrays with a leading axis of one row per device,
# sharded P("batch") over `pmap_mesh()` (how pmap lays out its outputs since JAX 0.4.31).
# Keeping them global jax.Arrays lets the same code run on one or many hosts.


def pmap_mesh() -> Mesh:
  """A 1-D mesh ("batch",) over all devices, in pmap's device order."""
  return Mesh(np.asarray(jax.devices()), ("batch",))


@functools.partial(jax.jit, static_argnums=1)
def stack_for_pmap(tree, mesh: Mesh):
  """Replicated arrays (...) -> (devices, ...) with one row on each device."""
  n = mesh.size
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (n, *x.shape)), tree)
  return jax.lax.with_sharding_constraint(stacked, NamedSharding(mesh, P("batch")))


@functools.partial(jax.jit, static_argnums=1)
def unstack_from_pmap(tree, mesh: Mesh):
  """(devices, ...) -> (...) replicated: row 0 (all rows are equal after a pmean step)."""
  return jax.lax.with_sharding_constraint(jax.tree.map(lambda x: x[0], tree), replicated(mesh))


def pmap_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's (B_local, ...) rows -> global (devices, B / devices, ...) arrays."""
  n = jax.local_device_count()
  sharding = NamedSharding(mesh, P("batch"))

  def split(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(f"Per-process batch {x.shape[0]} is not divisible by {n} local devices.")
    x = x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, (mesh.size, *x.shape[1:]))

  return jax.tree.map(split, local_batch)
