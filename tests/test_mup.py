"""muP (dit/mup.py, dit/optim.py): param groups, init, per-group AdamW, and the coordinate check.

The coordinate check trains a few Adam steps at several widths (head dimension fixed, num_heads
growing) on the same tiny batch and measures per-layer activations: under muP their scale and
their change stay within a band across widths; under the standard parametrization the change
grows with width (so the check fails without muP's learning-rate multipliers).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import tiny_config

from dit import mup, optim, train
from dit.cli import UserError
from dit.models import dit as dit_model

HEAD_DIM = 16
BASE_WIDTH = 32


def mup_config(width=128, base_width=BASE_WIDTH, **overrides):
  """The tiny digits config under muP at `width` (head dimension HEAD_DIM)."""
  return tiny_config(
    **{
      "parametrization": "mup",
      "mup.base_width": base_width,
      "model.hidden_size": width,
      "model.num_heads": width // HEAD_DIM,
      **overrides,
    }
  )


def groups_by_path(config) -> dict[str, str]:
  return {row["path"]: row["group"] for row in mup.describe(config)}


# ---- Param groups -----------------------------------------------------------------------


def test_dit_layers_fall_into_the_mup_groups():
  groups = groups_by_path(mup_config(model__depth=2))
  expected = {
    "x_embedder/kernel": "input",  # (p*p*C, D): fan_in fixed.
    "x_embedder/bias": "input",
    "t_embedder/mlp_0/kernel": "input",  # (256, D).
    "t_embedder/mlp_2/kernel": "hidden",  # (D, D).
    "y_embedder/embedding": "input",  # (classes + 1, D).
    "blocks_1/attn/qkv/kernel": "hidden",
    "blocks_1/attn/proj/kernel": "hidden",
    "blocks_1/mlp/fc1/kernel": "hidden",
    "blocks_1/mlp/fc2/kernel": "hidden",
    "blocks_1/mlp/fc2/bias": "input",
    "blocks_1/adaLN_modulation_1/kernel": "hidden",
    "final_layer/adaLN_modulation_1/kernel": "hidden",
    "final_layer/linear/kernel": "output",  # (D, p*p*C): fan_out fixed.
    "final_layer/linear/bias": "fixed",  # (p*p*C,): no width axis.
  }
  assert {path: groups[path] for path in expected} == expected
  assert set(groups.values()) == set(mup.GROUPS)


def test_pixart_layers_fall_into_the_mup_groups():
  config = mup_config(model__block="adaln_single")
  with config.unlocked():  # configs/digits.py has no caption keys.
    config.model.caption_channels, config.model.caption_length = 24, 4
  groups = groups_by_path(config)
  expected = {
    "t_block_1/kernel": "hidden",  # (D, 6 D).
    "blocks_0/scale_shift_table": "input",  # (6, D): a vector per modulation.
    "blocks_0/cross_attn/q_linear/kernel": "hidden",
    "blocks_0/cross_attn/kv_linear/kernel": "hidden",
    "final_layer/scale_shift_table": "input",
    "y_proj/fc1/kernel": "input",  # (caption_channels, D).
    "y_proj/fc2/kernel": "hidden",
    "y_embedding": "fixed",  # The null caption (L, caption_channels).
  }
  assert {path: groups[path] for path in expected} == expected


@pytest.mark.parametrize(
  "arch, fields, expected, input_layers",
  [
    (
      "mmdit",
      dict(depth=2),
      {
        "blocks_0/attn/context_qkv/kernel": "hidden",  # Both streams' joint attention.
        "blocks_0/context_mlp/fc2/kernel": "hidden",
        "pooled_embedder/linear_2/kernel": "hidden",
        "final_layer/linear/kernel": "output",
        "y_embedding": "fixed",
      },
      {"context_embedder", "pooled_embedder/linear_1", "t_embedder/mlp_0", "x_embedder"},
    ),
    (
      "flux",
      dict(depth=1, single_depth=1, axes_dim=(4, 6, 6), pooled_channels=0),
      {
        "double_blocks/blocks_0/txt_attn/qkv/kernel": "hidden",
        "double_blocks/blocks_0/img_attn/query_norm/scale": "fixed",  # (d_head,).
        "single_blocks/blocks_0/linear1/kernel": "hidden",  # (D, 3 D + mlp): fused.
        "time_in/out_layer/kernel": "hidden",
        "final_layer/linear/kernel": "output",
      },
      {"img_in", "time_in/in_layer", "txt_in", "vector_in/in_layer"},
    ),
  ],
)
def test_mmdit_and_flux_are_classified_by_their_shapes(arch, fields, expected, input_layers):
  model = dict(
    arch=arch, input_size=8, patch_size=2, in_channels=4, hidden_size=32, num_heads=2,
    caption_channels=12, caption_length=4, **fields,
  )  # fmt: skip
  config = ml_collections.ConfigDict(
    dict(parametrization="mup", mup=dict(base_width=16), model=model)
  )
  groups = groups_by_path(config)
  assert {path: groups[path] for path in expected} == expected
  inputs = {p.removesuffix("/kernel") for p, g in groups.items() if g == "input" and "kernel" in p}
  assert inputs == input_layers  # The embedders of latents, text, time and pooled vectors.


def test_groups_do_not_depend_on_the_width():
  at_base = groups_by_path(mup_config(width=BASE_WIDTH))  # m = 1: classified all the same.
  assert at_base == groups_by_path(mup_config(width=4 * BASE_WIDTH))
  assert mup.width_mult(mup_config(width=4 * BASE_WIDTH)) == 4.0


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"parametrization": "mu"}, "config.parametrization must be one of ('sp', 'mup'), got 'mu'"),
    ({"mup.base_width": 24}, "config.mup.base_width must be a positive multiple of the head"),
    ({"mup.base_width": 0}, "got 0"),
  ],
)
def test_bad_settings_are_named(overrides, message):
  config = mup_config(**{k.replace(".", "__"): v for k, v in overrides.items()})
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    optim.make_optimizer(config)


def test_configs_without_the_keys_are_the_standard_parametrization():
  config = tiny_config()
  config.unlock()
  del config["parametrization"], config["mup"]
  assert mup.parametrization(config) == "sp" and not mup.enabled(config)


# ---- The standard parametrization is unchanged; muP at the base width is it ----------------


def fake_grads(params):
  return jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params)


def first_step(config):
  """(initial params, first update) of the train loop's init_state and make_optimizer."""
  model = dit_model.build_model(config.model)
  tx, _ = optim.make_optimizer(config)

  @jax.jit  # One compile: eager optax would compile every op for every shape.
  def run():
    state = train.init_state(config, model, tx)
    params = state["params"]
    return params, tx.update(fake_grads(params), state["opt_state"], params)[0]

  return run()


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sp_is_the_adamw_of_before():
  # grad_clip 1.0 as in configs/digits.py.
  config = tiny_config(optim__weight_decay=0.01, optim__schedule="constant")
  params, updates = first_step(config)
  model = dit_model.build_model(config.model)
  o = config.optim
  before = optax.chain(  # make_optimizer before muP.
    optax.clip_by_global_norm(o.grad_clip),
    optax.adamw(optax.constant_schedule(o.lr), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
  )

  @jax.jit
  def reference():
    key = jax.random.split(jax.random.PRNGKey(config.seed))[0]
    params = model.init(key, *dit_model.example_inputs(model))["params"]
    return params, before.update(fake_grads(params), before.init(params), params)[0]

  assert_trees_equal((params, updates), reference())


def test_mup_at_the_base_width_is_sp():
  """Bit for bit in the params; the update to float rounding (XLA may contract the one-leaf
  groups' AdamW arithmetic differently, 1 ulp)."""
  sp_params, sp_updates = first_step(tiny_config(optim__weight_decay=0.01))
  params, updates = first_step(mup_config(width=32, base_width=32, optim__weight_decay=0.01))
  assert_trees_equal(sp_params, params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), sp_updates, updates
  )


# ---- muP init and AdamW -----------------------------------------------------------------


def rms(x):
  return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def leaf(tree, path: str):
  """The leaf of a param tree at "a/b/c"."""
  for name in path.split("/"):
    tree = tree[name]
  return tree


def test_mup_init_scales_by_group():
  config = mup_config(width=128)  # m = 4.
  params, _ = first_step(config)
  base_model = dit_model.build_model(mup.model_config_at(config.model, BASE_WIDTH))
  key = jax.random.split(jax.random.PRNGKey(config.seed))[0]
  base = jax.jit(base_model.init)(key, *dit_model.example_inputs(base_model))["params"]
  pairs = {
    "t_embedder/mlp_2/kernel": 0.5,  # Hidden, N(0, 0.02) in SP: 1 / sqrt(m) of the base.
    "blocks_0/mlp/fc1/kernel": 0.5,  # Hidden, xavier: already 1 / sqrt(m).
    "x_embedder/kernel": 1.0,  # Input, xavier in SP: kept at the base's scale.
    "y_embedder/embedding": 1.0,
  }
  for path, ratio in pairs.items():
    assert rms(leaf(params, path)) == pytest.approx(ratio * rms(leaf(base, path)), rel=1e-4), path
  assert not np.any(params["final_layer"]["linear"]["kernel"])  # Output: zero stays zero.


def test_mup_adamw_scales_the_adam_step_and_keeps_the_decay_per_step():
  """MuAdamW: group lr * k with weight_decay / k, so the Adam step is k times SP's and the
  decay per step lr * weight_decay is SP's (microsoft/mup's MuAdamW)."""
  config = mup_config(
    width=128, optim__grad_clip=0.0, optim__weight_decay=0.1, optim__schedule="constant"
  )
  tx, _ = optim.make_optimizer(config)
  sp_tx = optax.adam(config.optim.lr, b1=config.optim.b1, b2=config.optim.b2)
  model = dit_model.build_model(config.model)
  params = jax.tree.map(lambda a: jnp.full(a.shape, 0.5), dit_model.abstract_params(model))
  k = mup.lr_multipliers(config)
  assert sorted(set(jax.tree.leaves(k))) == [0.25, 1.0]
  assert [leaf(k, path) for path in ("x_embedder/kernel", "blocks_0/mlp/fc1/kernel")] == [1, 0.25]
  assert leaf(k, "final_layer/linear/kernel") == 0.25

  @jax.jit
  def run(params):
    grads = fake_grads(params)
    adam_step = sp_tx.update(grads, sp_tx.init(params), params)[0]  # -lr adam, no decay.
    return adam_step, tx.update(grads, tx.init(params), params)[0]

  adam_step, updates = run(params)
  decay = jax.tree.map(lambda p: -config.optim.lr * 0.1 * p, params)
  expected = jax.tree.map(lambda a, k_, d: k_ * a + d, adam_step, k, decay)
  jax.tree.map(
    lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-9), updates, expected
  )


# ---- Coordinate check -------------------------------------------------------------------

LAYERS = ("x_embedder", "blocks_0", "final_layer")


def coordinates(width: int, lr: float, steps: int) -> dict[str, dict[str, np.ndarray]]:
  """{"sp" | "mup": {layer: [mean |h_T|, mean |h_T - h_0|]}} after `steps` Adam steps at a
  constant `lr` on one fixed batch; one compiled program per width (the two parametrizations
  are vmapped: the same model, their inits and lr multipliers stacked)."""
  config = mup_config(width, model__depth=1)
  model = dit_model.build_model(config.model)
  base_model = dit_model.build_model(mup.model_config_at(config.model, BASE_WIDTH))
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
  eps = rng.normal(size=x0.shape).astype(np.float32)
  x_t, t = 0.8 * x0 + 0.6 * eps, rng.integers(0, 1000, 8).astype(np.float32)
  cond = {"label": rng.integers(0, 10, 8).astype(np.int32)}
  adam = optax.adam(lr)

  def forward(params):
    out, state = model.apply(
      {"params": params},
      x_t,
      t,
      cond,
      capture_intermediates=lambda module, _: module.name in LAYERS,
      mutable=["intermediates"],
    )
    acts = {name: v["__call__"][0] for name, v in state["intermediates"].items()}
    return jnp.mean(jnp.square(out - eps)), acts

  def fit(params, lr_mult):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(lambda p: forward(p)[0])(params)
      updates, opt_state = adam.update(grads, opt_state)
      updates = jax.tree.map(jnp.multiply, updates, lr_mult)
      return (optax.apply_updates(params, updates), opt_state), None

    acts0 = forward(params)[1]
    (params, _), _ = jax.lax.scan(step, (params, adam.init(params)), length=steps)
    acts = forward(params)[1]
    return {
      name: jnp.stack([jnp.mean(jnp.abs(acts[name])), jnp.mean(jnp.abs(acts[name] - acts0[name]))])
      for name in LAYERS
    }

  lr_mults = mup.lr_multipliers(config)

  @jax.jit
  def run(key):
    sp = model.init(key, *dit_model.example_inputs(model))["params"]
    base = base_model.init(key, *dit_model.example_inputs(base_model))["params"]
    params = jax.tree.map(lambda *p: jnp.stack(p), sp, mup.rescale_init(config, sp, base))
    ones = jax.tree.map(lambda _: 1.0, lr_mults)
    mults = jax.tree.map(lambda *k: jnp.array(k), ones, lr_mults)
    return jax.vmap(fit)(params, mults)

  out = jax.device_get(run(jax.random.key(0)))
  return {par: {name: out[name][i] for name in LAYERS} for i, par in enumerate(("sp", "mup"))}


def spread(coords: dict, par: str, layer: str, what: int) -> float:
  """max / min over widths of a coordinate (what: 0 the scale, 1 the change)."""
  values = [c[par][layer][what] for c in coords.values()]
  return max(values) / min(values)


def growth(coords: dict, par: str, layer: str) -> float:
  """The change at the widest width over that at the narrowest."""
  widths = sorted(coords)
  return coords[widths[-1]][par][layer][1] / coords[widths[0]][par][layer][1]


def check_coordinates(widths, lr=1e-2, steps=3, band=1.5, drift=2.5):
  coords = {w: coordinates(w, lr, steps) for w in widths}
  for layer in LAYERS:
    for what in (0, 1):
      assert spread(coords, "mup", layer, what) < band, (layer, what, coords)
  # SP: the hidden and output layers' Adam steps add up over a width that grows.
  for layer in ("blocks_0", "final_layer"):
    assert growth(coords, "sp", layer) > drift, (layer, coords)


def test_coordinate_check():
  check_coordinates((32, 256))


@pytest.mark.slow
def test_coordinate_check_four_widths():
  check_coordinates((32, 64, 128, 256))


# ---- The train loop -----------------------------------------------------------------------


def test_resuming_under_another_parametrization_is_refused():
  saved = {"model": {}}  # A config.json older than the key: the standard parametrization.
  assert mup.resume_conflicts(saved, tiny_config()) == []
  assert mup.resume_conflicts(saved, mup_config()) == [
    "parametrization: checkpoint has 'sp', config has 'mup'"
  ]
  assert mup.resume_conflicts({"parametrization": "mup"}, mup_config(base_width=64)) == []


@pytest.mark.slow
def test_train_loop_runs_and_resumes_under_mup(tmp_path):
  config = mup_config(width=64)  # m = 2.
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state["step"]) == config.total_steps
  restored, _ = train.restore_state(config, str(tmp_path))
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state["opt_state"])
  with pytest.raises(UserError, match="parametrization: checkpoint has 'mup'"):
    train.train_and_evaluate(mup_config(width=64, parametrization="sp"), str(tmp_path))
