"""muP (maximal update parametrization, Tensor Programs V): hyperparameters tuned at one width
transfer to wider models.

config.parametrization = "sp" (standard, the default: nothing here runs) | "mup";
config.mup.base_width: the hidden_size at which the hyperparameters were tuned. Under muP a
model of width D = hidden_size has the width multiplier m = D / base_width, and

  group   what (shapes vs the base model)          init std           Adam(W) lr
  input   fan_in fixed, fan_out grows: patch       base's             lr
          embedding, label table, first layers of
          the timestep / caption MLPs, biases, norm
          scales, adaLN tables
  hidden  fan_in and fan_out grow: attention, MLP,  base's / sqrt(m)   lr / m
          adaLN regressions, second embedder layers
  output  fan_in grows, fan_out fixed: the final    base's / m         lr / m
          linear (zero-initialised in DiT: stays 0)
  fixed   no width dimension: the final bias, the   base's             lr
          null caption, qk-norm scales (per head)

(TP5 Table 3, relative to the base model so that muP at m = 1 is exactly the standard model.)
Decoupled weight decay keeps lr * weight_decay per step in every group, as microsoft/mup's
MuAdamW does (a group's lr * k goes with weight_decay / k, k = LR_SCALE): dit/optim.py.

Groups come from shapes, not from layer names, as mup's `set_base_shapes` does: the model of
config.model is built at base_width and at 2 x base_width (hidden_size changed, num_heads
changed with it so the head dimension stays fixed; nothing is allocated) and an axis whose
size differs is a width axis. So every block type and architecture (config.model.arch: DiT,
MMDiT, Flux) is classified without a table of its layers. Kernels are (fan_in..., fan_out)
(Flax Dense, DenseGeneral, Conv; embedding tables (rows, D)): a param with one width axis is
"input" if that is its last axis, else "output".

Attention logits: muP scales them by 1/d_head, the standard models by 1/sqrt(d_head). Here the
head dimension is the same at every width (the width grows by num_heads, as in Zheng et al.
2025's DiT-muP), so the two differ by the width-independent factor sqrt(d_head), which the
base model's tuning absorbs: the models keep their 1/sqrt(d_head).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dit.cli import UserError
from dit.models import dit as dit_model

PARAMETRIZATIONS = ("sp", "mup")
GROUPS = ("input", "hidden", "output", "fixed")

# Per group, as functions of the width multiplier m: the Adam(W) learning-rate factor and the
# init std factor relative to the base model's (TP5 Table 3).
LR_SCALE: dict[str, Callable[[float], float]] = {
  "input": lambda m: 1.0,
  "hidden": lambda m: 1.0 / m,
  "output": lambda m: 1.0 / m,
  "fixed": lambda m: 1.0,
}
INIT_SCALE: dict[str, Callable[[float], float]] = {
  "input": lambda m: 1.0,
  "hidden": lambda m: m**-0.5,
  "output": lambda m: 1.0 / m,
  "fixed": lambda m: 1.0,
}


def parametrization(config: ml_collections.ConfigDict) -> str:
  """config.parametrization ("sp" for configs without the key), checked."""
  value = config.get("parametrization", "sp")
  if value not in PARAMETRIZATIONS:
    raise UserError(f"config.parametrization must be one of {PARAMETRIZATIONS}, got {value!r}.")
  return value


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether config.parametrization is "mup" (then base_width and the model are checked)."""
  if parametrization(config) != "mup":
    return False
  base_width(config)
  return True


def _head_dim(model_config: dict) -> int:
  for key in ("hidden_size", "num_heads"):
    if key not in model_config:
      raise UserError(
        f"config.parametrization='mup' scales config.model.hidden_size and num_heads, but "
        f"config.model has no {key!r} (arch {model_config.get('arch', 'dit')!r})."
      )
  d, h = model_config["hidden_size"], model_config["num_heads"]
  if h <= 0 or d % h:
    raise UserError(f"config.model.hidden_size={d} is not divisible by num_heads={h}.")
  return d // h


def base_width(config: ml_collections.ConfigDict) -> int:
  """config.mup.base_width, checked: positive and a multiple of the head dimension."""
  width = config.mup.base_width if "mup" in config else None
  head_dim = _head_dim(dict(config.model))
  if not isinstance(width, int) or isinstance(width, bool) or width <= 0 or width % head_dim:
    raise UserError(
      f"config.mup.base_width must be a positive multiple of the head dimension "
      f"(hidden_size / num_heads = {head_dim}), got {width!r}."
    )
  return width


def width_mult(config: ml_collections.ConfigDict) -> float:
  """m = config.model.hidden_size / config.mup.base_width."""
  return config.model.hidden_size / base_width(config)


def model_config_at(model_config: ml_collections.ConfigDict | dict, width: int) -> dict:
  """config.model at hidden_size `width`, num_heads scaled so that the head dimension stays."""
  model_config = dict(model_config)
  head_dim = _head_dim(model_config)
  if width <= 0 or width % head_dim:
    raise UserError(f"width {width} is not a positive multiple of the head dimension {head_dim}.")
  return dict(model_config, hidden_size=width, num_heads=width // head_dim)


def _shapes(model_config: dict) -> dict:
  try:
    model = dit_model.build_model(model_config)
  except ValueError as e:
    width = model_config["hidden_size"]
    raise UserError(f"Bad config.model for muP at hidden_size {width}: {e}") from e
  return jax.tree.map(lambda a: a.shape, dit_model.abstract_params(model))


def _group(path: str, base: tuple, delta: tuple, target: tuple) -> str:
  """The muP group of one param from its shapes at base width, 2 x base width and its own."""
  if not len(base) == len(delta) == len(target):
    raise UserError(f"param {path}: shapes {base}, {delta}, {target} differ in rank across widths.")
  for axis, (b, d, t) in enumerate(zip(base, delta, target, strict=True)):
    if b == d and t != b:
      raise UserError(
        f"param {path} has shape {target}, but axis {axis} (size {b} at base width and at twice "
        "that) does not follow the width; muP needs every such axis fixed."
      )
  width_axes = [axis for axis, (b, d) in enumerate(zip(base, delta, strict=True)) if b != d]
  if not width_axes:
    return "fixed"
  if len(width_axes) == 1:
    return "input" if width_axes[0] == len(base) - 1 else "output"
  if len(width_axes) == 2:
    return "hidden"
  raise UserError(
    f"param {path} of shape {target} has {len(width_axes)} width axes; muP needs <= 2."
  )


def param_groups(config: ml_collections.ConfigDict) -> dict:
  """The param tree of config.model with a group name (GROUPS) for each leaf (no allocation)."""
  width = base_width(config)
  base = _shapes(model_config_at(config.model, width))
  delta = _shapes(model_config_at(config.model, 2 * width))
  target = _shapes(dict(config.model))
  if jax.tree.structure(base, is_leaf=_is_shape) != jax.tree.structure(target, is_leaf=_is_shape):
    raise UserError(
      "config.model has other params at config.mup.base_width than at its hidden_size; muP "
      "needs the same layers at every width."
    )
  return jax.tree_util.tree_map_with_path(
    lambda path, b, d, t: _group(jax.tree_util.keystr(path, simple=True, separator="/"), b, d, t),
    base,
    delta,
    target,
    is_leaf=_is_shape,
  )


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple)


def lr_multipliers(config: ml_collections.ConfigDict) -> dict:
  """Per-param Adam(W) learning-rate factors (1 or 1/m), the tree of the params."""
  m = width_mult(config)
  return jax.tree.map(lambda g: LR_SCALE[g](m), param_groups(config))


def init_params(config: ml_collections.ConfigDict, params: dict, key: jax.Array) -> dict:
  """muP init of `params`, freshly initialised by config.model's model from `key`: each param
  is rescaled so that its RMS is the base model's (initialised from the same key) times its
  group's INIT_SCALE (see `rescale_init`). Jittable; the base model's init runs inside.
  """
  base_model = dit_model.build_model(model_config_at(config.model, base_width(config)))
  base = base_model.init(key, *dit_model.example_inputs(base_model))["params"]
  return rescale_init(config, params, base)


def rescale_init(config: ml_collections.ConfigDict, params: dict, base_params: dict) -> dict:
  """params * (INIT_SCALE[group](m) * RMS(base param) / RMS(param)), leaf by leaf; a param
  whose RMS (or its base's) is zero (zero-initialised: adaLN, gates, the final linear) stays.

  So the standard init's per-layer choices (xavier, N(0, 0.02), PixArt's tables) are kept at
  the base width and scale with width as muP prescribes: an N(0, 0.02) hidden layer (the
  timestep MLP's second layer) shrinks by 1/sqrt(m), the xavier patch embedding (an input
  layer) keeps its base scale, xavier hidden layers stay as they are (their variance already
  goes as 1/fan_in). The factor is a ratio of two sample RMS, so it carries their sampling
  noise (about 1/sqrt(2 n) for n entries; 4% for the 11 x 32 label table); at m = 1 the base
  params are the params and they come back unchanged, bit for bit.
  """
  m = width_mult(config)

  def rms(x):
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))

  def rescale(group, p, b):
    rp, rb = rms(p), rms(b)
    ok = (rp > 0) & (rb > 0)
    factor = jnp.where(ok, INIT_SCALE[group](m) * rb / jnp.where(ok, rp, 1), 1)
    return (p * factor).astype(p.dtype)

  return jax.tree.map(rescale, param_groups(config), params, base_params)


def describe(config: ml_collections.ConfigDict) -> list[dict]:
  """One row per param: {"path", "shape", "group", "lr_mult", "init_mult"} (for docs, checks)."""
  m = width_mult(config)
  groups = jax.tree_util.tree_leaves_with_path(param_groups(config))
  shapes = jax.tree.leaves(_shapes(dict(config.model)), is_leaf=_is_shape)
  return [
    dict(
      path=jax.tree_util.keystr(path, simple=True, separator="/"),
      shape=shape,
      group=group,
      lr_mult=LR_SCALE[group](m),
      init_mult=INIT_SCALE[group](m),
    )
    for (path, group), shape in zip(groups, shapes, strict=True)
  ]


def resume_conflicts(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """Why a run whose config.json is `saved` cannot resume under `config`: [] or a line
  naming the parametrization (the optimizer state of "sp" and "mup" differ in layout; a
  changed base_width only changes learning rates, like a changed config.optim.lr)."""
  old = saved.get("parametrization", "sp")  # config.json files older than the key: "sp".
  new = parametrization(config)
  return [] if old == new else [f"parametrization: checkpoint has {old!r}, config has {new!r}"]
