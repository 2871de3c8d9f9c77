"""Reading Hugging Face style model directories from local disk (no network).

A model directory holds `config.json` and weights as `<stem>.safetensors`, or as shards
listed in `<stem>.safetensors.index.json`. Weights come back as a flat dict of NumPy
arrays keyed by the PyTorch parameter names; converters map them into Flax params.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load_file


def read_config(model_dir: str, name: str = "config.json") -> dict:
  """Returns the parsed `config.json` of a local model directory."""
  path = os.path.join(model_dir, name)
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"Model directory {model_dir!r} does not exist.")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"Model directory {model_dir!r} has no {name}; it holds {sorted(os.listdir(model_dir))}."
    )
  with open(path) as f:
    return json.load(f)


def read_safetensors(model_dir: str, stem: str = "model") -> dict[str, np.ndarray]:
  """Loads `<stem>.safetensors` or the shards named in `<stem>.safetensors.index.json`.

  bf16 tensors are returned as float32 (NumPy has no bfloat16 of its own).
  """
  single = os.path.join(model_dir, f"{stem}.safetensors")
  index = os.path.join(model_dir, f"{stem}.safetensors.index.json")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"Shards listed in {index} are missing: {missing}")
  else:
    present = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else "no such directory"
    raise FileNotFoundError(
      f"No weights in {model_dir!r}: expected {stem}.safetensors or "
      f"{stem}.safetensors.index.json; found {present}."
    )
  weights = {}
  for path in files:
    try:
      weights.update(_load(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers.
      raise ValueError(f"Could not read safetensors file {path!r}: {e}") from e
  return weights


def _load(path: str) -> dict[str, np.ndarray]:
  try:
    return load_file(path)
  except TypeError:
    # NumPy cannot hold bf16: go through the framework-agnostic safe_open with flax/jax.
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="flax") as f:
      for key in f.keys():
        out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return out


def check_keys(
  weights: Mapping[str, np.ndarray],
  expected: Mapping[str, tuple[int, ...]],
  source: str,
) -> None:
  """Raises a ValueError naming missing, unexpected and mis-shaped tensors."""
  missing = sorted(set(expected) - set(weights))
  unexpected = sorted(set(weights) - set(expected))
  misshaped = [
    f"{k}: expected {tuple(expected[k])}, got {tuple(weights[k].shape)}"
    for k in sorted(set(expected) & set(weights))
    if tuple(weights[k].shape) != tuple(expected[k])
  ]
  if missing or unexpected or misshaped:
    lines = [f"Checkpoint {source} does not match the model:"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {missing[:20]}")
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    if misshaped:
      lines.append(f"  mis-shaped tensors ({len(misshaped)}): {misshaped[:20]}")
    raise ValueError("\n".join(lines))
