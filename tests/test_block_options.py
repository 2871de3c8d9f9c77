"""DiT's block options (norm, mlp, pos_embed, qk_norm): every combination builds with the
expected params; RoPE, SwiGLU, RMSNorm and the RMSNorm QK-norm match NumPy written from their
formulas; RoPE reaches every block type (and not in_context's condition tokens); scanned equals
unrolled; bad settings fail at construction; old boolean qk_norm configs load; a RoPE model runs
at a resolution and aspect ratio it was not built for; diffusers export refuses the options.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.models import ablation_blocks, attention, export, layers
from dit.models.blocks import BlockSettings, Conditioning
from dit.models.dit import BLOCKS, POS_EMBEDS, DiT, build_model, example_inputs
from dit.models.rope import apply_rope

# Depth 2, D 16, 2 heads of 8 (divisible by 4: 2D RoPE rotates 2 pairs per axis), 4x4 tokens.
TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2)
ALL_ON = dict(norm="rmsnorm", mlp="swiglu", pos_embed="both", qk_norm="rmsnorm")
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _fields(block="adaln_zero", **options):
  captions = BLOCKS[block].captions
  return (
    dict(TINY, num_classes=10, block=block, caption_channels=8 if captions else 0, caption_length=3)
    | options
  )


def _shapes(model):
  x, t, cond = example_inputs(model, 2)
  return jax.eval_shape(model.init, jax.random.key(0), x, t, cond)["params"]


def _jit(f, *args):
  """f compiled for args with the CPU compiler's cheap passes (tests compare, never time)."""
  return jax.jit(f).lower(*args).compile(FAST_COMPILE)


def _random(model, seed=0):
  """Random values for every param (zero-init ones too) and random inputs."""
  rng = np.random.default_rng(seed)
  shapes = _shapes(model)
  params = jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), shapes)
  x, t, cond = example_inputs(model, 2)
  x = rng.standard_normal(x.shape).astype(np.float32)
  cond = dict(cond, label=np.array([1, 4]))
  if "text" in cond:
    cond["text"] = rng.standard_normal(cond["text"].shape).astype(np.float32)
  return params, x, np.array([3.0, 700.0], np.float32), cond


# ---- every combination -----------------------------------------------------------------------

DEFAULT_TOP_LEVEL = {
  "x_embedder", "t_embedder", "y_embedder", "y_embedding", "y_proj", "blocks_0", "final_layer"
}  # fmt: skip
COMBINATIONS = list(
  itertools.product(layers.NORMS, layers.MLPS, POS_EMBEDS, attention.QK_NORMS)
)  # 36


@pytest.mark.parametrize("norm, mlp, pos_embed, qk_norm", COMBINATIONS)
def test_every_combination_builds_with_its_params(norm, mlp, pos_embed, qk_norm):
  options = dict(norm=norm, mlp=mlp, pos_embed=pos_embed, qk_norm=qk_norm)
  model = build_model(_fields(depth=1, **options))
  x, t, cond = example_inputs(model, 2)
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x, t, cond)
  assert out.shape == (2, 8, 8, 6)
  block, final = variables["params"]["blocks_0"], variables["params"]["final_layer"]
  d = 16
  # RMSNorm has a scale (norm1, norm2, the final norm); the adaLN LayerNorms have nothing.
  norms = {"norm1", "norm2"} & set(block)
  assert norms == ({"norm1", "norm2"} if norm == "rmsnorm" else set())
  assert ("norm_final" in final) == (norm == "rmsnorm")
  hidden = 4 * d if mlp == "gelu" else int(2 / 3 * 4 * d)
  fc1 = 2 * hidden if mlp == "swiglu" else hidden
  assert block["mlp"]["fc1"]["kernel"].shape == (d, fc1)
  assert block["mlp"]["fc2"]["kernel"].shape == (hidden, d)
  q_norm = block["attn"].get("q_norm")
  expected = {"": None, "layernorm": {"LayerNorm_0"}, "rmsnorm": {"scale"}}[qk_norm]
  assert (q_norm and set(q_norm)) == expected
  # Positions add no params either way (fixed tables).
  assert set(variables["params"]) == DEFAULT_TOP_LEVEL


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_every_block_type_takes_every_option(block):
  model = build_model(_fields(block, **ALL_ON))
  x, t, cond = example_inputs(model, 2)
  out = jax.eval_shape(model.init_with_output, jax.random.key(0), x, t, cond)[0]
  assert out.shape == (2, 8, 8, 6)
  params = _shapes(model)
  assert params["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (16, 2 * 42)
  assert "scale" in params["blocks_0"]["attn"]["q_norm"]
  assert "norm_final" in params["final_layer"]


# ---- NumPy references ------------------------------------------------------------------------


def np_rope(x, positions, axes_dim, theta=10000.0):
  """x (N, Dh) with each channel pair (2i, 2i+1) of axis a rotated by pos_a theta^(-2i/dim_a)."""
  out, start = x.astype(np.float64).copy(), 0
  for a, dim in enumerate(axes_dim):
    for i in range(dim // 2):
      angle = positions[:, a] * theta ** (-2 * i / dim)
      c0, c1 = start + 2 * i, start + 2 * i + 1
      x0, x1 = x[:, c0], x[:, c1]
      out[:, c0] = x0 * np.cos(angle) - x1 * np.sin(angle)
      out[:, c1] = x0 * np.sin(angle) + x1 * np.cos(angle)
    start += dim
  return out


def _rotate(model, x, grid_h, grid_w):
  """x (N, Dh) rotated with the model's RoPE tables for a grid_h x grid_w grid."""
  cos, sin = model.rope_cos_sin(grid_h, grid_w)
  return np.asarray(apply_rope(jnp.asarray(x)[None, :, None], cos, sin)[0, :, 0])


def test_rope_rotates_a_known_vector():
  model = DiT(**_fields(pos_embed="rope"))  # Head dim 8: 4 channels (2 pairs) per axis.
  x = np.zeros((16, 8), np.float32)
  x[:, 0] = 1.0  # The first row pair, frequency theta^0 = 1: angle = row.
  x[:, 6] = 1.0  # The column's second pair, frequency theta^(-1/2) = 0.01: angle = col / 100.
  got = _rotate(model, x, 4, 4)
  rows, cols = np.divmod(np.arange(16), 4)
  want = np.zeros((16, 8))
  want[:, 0], want[:, 1] = np.cos(rows), np.sin(rows)
  want[:, 6], want[:, 7] = np.cos(cols / 100), np.sin(cols / 100)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_rope_matches_numpy_at_another_grid_on_the_table_positions():
  """An 8x12 latent (4x6 tokens) of a model built at 8x8 (4x4): positions row * 4/4 and
  col * 4/6, as the sin-cos table's (PixArt's base_size), then divided by pe_interpolation."""
  model = DiT(**_fields(pos_embed="rope", rope_theta=100.0, pe_interpolation=2.0))
  x = np.random.default_rng(0).standard_normal((24, 8)).astype(np.float32)
  rows, cols = np.divmod(np.arange(24), 6)
  positions = np.stack([rows * 4 / 4, cols * 4 / 6], axis=1) / 2.0
  want = np_rope(x, positions, (4, 4), theta=100.0)
  np.testing.assert_allclose(_rotate(model, x, 4, 6), want, atol=1e-5)


def test_rope_dot_products_depend_only_on_the_position_difference():
  model = DiT(**_fields(pos_embed="rope"))
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 8)).astype(np.float32)
  rq = _rotate(model, np.tile(q, (16, 1)), 4, 4)  # q at every token of the 4x4 grid.
  rk = _rotate(model, np.tile(k, (16, 1)), 4, 4)
  dots = rq @ rk.T  # (16 queries, 16 keys).
  pos = np.stack(np.divmod(np.arange(16), 4), axis=1)
  by_offset = {}
  for i, j in itertools.product(range(16), range(16)):
    by_offset.setdefault(tuple(pos[i] - pos[j]), []).append(dots[i, j])
  for offset, values in by_offset.items():
    np.testing.assert_allclose(values, values[0], atol=1e-5, err_msg=str(offset))
  firsts = np.array([v[0] for v in by_offset.values()])
  assert np.ptp(firsts) > 0.5  # And it does depend on the difference.


def _init_random(module, *args, seed=0):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  return jax.tree.map(lambda p: (0.5 * rng.standard_normal(p.shape)).astype(np.float32), shapes)


def np_rms_norm(x, scale):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale


def test_swiglu_and_rmsnorm_match_numpy():
  x = np.random.default_rng(2).standard_normal((2, 5, 16)).astype(np.float32)
  swiglu = layers.feed_forward("swiglu", 16, 4.0, jnp.float32)
  p = _init_random(swiglu, x)
  hidden = layers.swiglu_hidden(16, 4.0)
  assert hidden == 42 and p["fc1"]["kernel"].shape == (16, 84)
  a = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  gate, value = a[..., :hidden], a[..., hidden:]
  want = (gate / (1 + np.exp(-gate)) * value) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  np.testing.assert_allclose(swiglu.apply({"params": p}, x), want, atol=1e-5)
  # LightningDiT's widths: int(2/3 * 4 D), not rounded to a multiple.
  assert [layers.swiglu_hidden(d, 4.0) for d in (1152, 1024, 128)] == [3072, 2730, 341]

  for affine in (False, True):
    rms = layers.norm_layer("rmsnorm", jnp.float32, affine=affine)
    p = _init_random(rms, x)
    np.testing.assert_allclose(rms.apply({"params": p}, x), np_rms_norm(x, p["scale"]), atol=1e-5)
  plain = layers.norm_layer("layernorm", jnp.float32)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  np.testing.assert_allclose(plain.apply({}, x), (x - mean) / np.sqrt(var + 1e-6), atol=1e-5)


def test_self_attention_with_rmsnorm_qk_norm_then_rope_matches_numpy():
  """qkv -> per-head RMSNorm of q and k -> RoPE of q and k -> softmax(q k / sqrt(Dh)) v -> proj."""
  b, n, d, h = 2, 16, 16, 2
  x = np.random.default_rng(3).standard_normal((b, n, d)).astype(np.float32)
  model = DiT(**_fields(pos_embed="rope"))
  cos, sin = model.rope_cos_sin(4, 4)
  attn = attention.SelfAttention(h, qk_norm="rmsnorm", implementation="einsum")
  p = _init_random(attn, x, None, (cos, sin))
  got = attn.apply({"params": p}, x, rope=(cos, sin))

  qkv = (x @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(b, n, 3, h, d // h)
  q = np_rms_norm(qkv[:, :, 0], p["q_norm"]["scale"])
  k = np_rms_norm(qkv[:, :, 1], p["k_norm"]["scale"])
  positions = np.stack(np.divmod(np.arange(n), 4), axis=1).astype(np.float64)
  rot = lambda z: np.stack(
    [np.stack([np_rope(z[i, :, j], positions, (4, 4)) for j in range(h)], 1) for i in range(b)]
  )
  q, k, v = rot(q), rot(k), qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, d)
  want = out @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(got, want, atol=2e-5)


# ---- RoPE reaches the blocks ---------------------------------------------------------------


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_rope_reaches_every_block_type(block):
  """Without positions a DiT is permutation-equivariant over its patches; RoPE alone (no
  table) must break that in every block type."""
  model = build_model(_fields(block, pos_embed="rope", depth=1))
  params, x, t, cond = _random(model)
  patches = x.reshape(2, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 2, 2, 3)
  perm = np.random.default_rng(4).permutation(16)
  unpatch = lambda z: z.reshape(2, 4, 4, 2, 2, -1).transpose(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, -1)
  x_perm = unpatch(patches[:, perm])
  run = lambda x: model.apply({"params": params}, x, t, cond)
  both = np.concatenate([x, x_perm])
  t, cond = np.tile(t, 2), jax.tree.map(lambda c: np.concatenate([c, c]), cond)
  out, out_perm = np.split(np.asarray(_jit(run, both)(both)), 2)
  out_patches = out.reshape(2, 4, 2, 4, 2, 6).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 2, 2, 6)
  # Float error alone (the same sums in another order) is ~1e-7 of the output.
  assert np.abs(unpatch(out_patches[:, perm]) - out_perm).max() > 1e-3 * np.abs(out).max()


class _Probe(ablation_blocks.PlainBlock):
  """Records the rope it is given; the identity on the tokens."""

  @nn.compact
  def __call__(self, x, rope=None):
    self.sow("intermediates", "rope", rope)
    return x


class _InContext(nn.Module):
  @nn.compact
  def __call__(self, tokens, cond):
    settings = BlockSettings(1, 16, 2, 4.0, "", "xla", jnp.float32)
    return ablation_blocks.in_context_stack(_Probe, settings, tokens, cond)


def test_in_context_condition_tokens_are_not_rotated():
  cos, sin = DiT(**_fields(pos_embed="rope")).rope_cos_sin(4, 4)  # (16, 8) each.
  cond = Conditioning(jnp.ones((2, 16)), jnp.ones((2, 2, 16)), rope=(cos, sin))
  _, state = _InContext().init_with_output(
    jax.random.key(0), jnp.ones((2, 16, 16)), cond, mutable=["intermediates"]
  )
  ((got_cos, got_sin),) = state["intermediates"]["blocks_0"]["rope"]
  np.testing.assert_array_equal(got_cos[:16], cos)
  np.testing.assert_array_equal(got_sin[:16], sin)
  np.testing.assert_array_equal(got_cos[16:], np.ones((2, 8)))  # The identity rotation.
  np.testing.assert_array_equal(got_sin[16:], np.zeros((2, 8)))


def test_rope_model_runs_at_another_resolution_and_aspect_ratio():
  model = build_model(_fields(**ALL_ON, depth=1))  # Built at 8x8 (4x4 tokens).
  params, x, t, cond = _random(model)
  x = np.random.default_rng(5).standard_normal((2, 8, 12, 3)).astype(np.float32)
  out = _jit(lambda x: model.apply({"params": params}, x, t, cond), x)(x)
  assert out.shape == (2, 8, 12, 6) and np.all(np.isfinite(out)) and np.abs(out).max() > 0.1


# ---- scan, bad settings, old configs, export -----------------------------------------------


def test_scan_matches_unrolled_with_the_options():
  """Scanned (the rope tables a closed-over argument of every step) == unrolled."""
  model = build_model(_fields(**ALL_ON, caption_channels=0))
  params, x, t, cond = _random(model)

  def run(params):
    rows = []
    for m in (model, model.clone(scan=True)):
      loss = lambda p, m=m: jnp.mean(jnp.sin(m.apply({"params": p}, x, t, cond)))
      rows.append(jax.value_and_grad(loss)(params))
    return rows

  (l0, g0), (l1, g1) = _jit(run, params)(params)
  np.testing.assert_allclose(l1, l0, atol=1e-6)
  assert float(jnp.abs(g0["blocks_1"]["norm1"]["scale"]).max()) > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g0)


@pytest.mark.parametrize(
  "options, match",
  [
    (dict(norm="batchnorm"), r"norm must be one of \('layernorm', 'rmsnorm'\), got 'batchnorm'"),
    (dict(mlp="relu"), r"mlp must be one of \('gelu', 'swiglu'\), got 'relu'"),
    (dict(pos_embed="alibi"), r"pos_embed must be one of \('sincos', 'rope', 'both'\)"),
    (dict(qk_norm="l2"), r"qk_norm must be one of \('', 'layernorm', 'rmsnorm'\).*got 'l2'"),
    (
      dict(pos_embed="rope", hidden_size=24, num_heads=4),
      r"pos_embed='rope' \(2D axial RoPE\) needs the head dimension hidden_size / num_heads = "
      r"24 / 4 = 6 divisible by 4",
    ),
    (dict(pos_embed="both", hidden_size=24, num_heads=4), r"pos_embed='both' .* = 6 divisible"),
    (
      dict(hidden_size=18, num_heads=2),
      r"pos_embed='sincos' adds the 2D sin-cos table, which needs hidden_size divisible by 4",
    ),
    (dict(pos_embed="rope", rope_theta=0.0), r"rope_theta must be > 0 with pos_embed='rope'"),
    (
      dict(mlp="swiglu", mlp_ratio=0.05),
      r"mlp='swiglu' with mlp_ratio=0.05 .* without hidden units",
    ),
  ],
)
def test_bad_settings_fail_at_construction(options, match):
  with pytest.raises(ValueError, match=match):
    build_model(_fields(**options))
  model = DiT(**_fields(**options))  # A DiT built directly fails at init.
  with pytest.raises(ValueError, match=match):
    _shapes(model)


def test_old_boolean_qk_norm_configs_load_as_before():
  """config.json's qk_norm true / false build the model of "layernorm" / "": the same init and
  forward program (so the same param names and values, and outputs)."""
  program = lambda m: str(jax.make_jaxpr(m.init_with_output)(jax.random.key(0), *inputs))
  for old, new in ((True, "layernorm"), (False, "")):
    old_model, new_model = build_model(_fields(qk_norm=old)), build_model(_fields(qk_norm=new))
    inputs = example_inputs(old_model, 2)
    assert program(old_model) == program(new_model)
  assert set(_shapes(old_model)["blocks_0"]["attn"]) == {"qkv", "proj"}
  layer = _shapes(build_model(_fields(qk_norm=True)))["blocks_0"]["attn"]["k_norm"]
  assert set(layer["LayerNorm_0"]) == {"scale", "bias"}  # The layout of the boolean field.


@pytest.mark.parametrize(
  "field, value",
  [("norm", "rmsnorm"), ("mlp", "swiglu"), ("pos_embed", "rope"), ("pos_embed", "both"),
   ("qk_norm", "rmsnorm"), ("qk_norm", "layernorm"), ("qk_norm", True)],
)  # fmt: skip
def test_diffusers_export_refuses_the_options(field, value):
  model = DiT(**dict(TINY, num_classes=10, hidden_size=32, **{field: value}))
  with pytest.raises(ValueError, match=rf"^Cannot export to diffusers: config\.model\.{field}="):
    export.check_exportable(model)
  assert export.check_exportable(DiT(**dict(TINY, num_classes=10, time_freq_shift=1.0))) == []
