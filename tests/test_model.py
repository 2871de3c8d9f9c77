"""DiT model: its maths against tests/numpy_dit.py (a float64 NumPy reference, no torch) for
every block type, the timestep sinusoid and position table against their closed forms, the
adaLN-Zero gates, attention against NumPy; shapes, initialisation, conditioning,
dtype/remat/attention equivalences and bad-input errors. (Parity with diffusers, which needs
the torch extra, is in test_convert.py.)"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import numpy_dit
import pytest

from dit.models import attention, blocks, layers
from dit.models.dit import BLOCKS, DiT, build_model, example_inputs, sincos_pos_embed_2d

SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=3)
PIXART = dict(SMALL, num_classes=0, block="adaln_single", caption_channels=16, caption_length=5)
# Documented tolerance of bfloat16 compute vs float32 (see the DiT docstring): the max abs error
# relative to the output's standard deviation.
BF16_REL_TOL = 5e-2


def _init(model, seed=0, batch=2):
  """The model's own initialisation (jitted: eager init compiles every RNG op separately)."""
  x, t, cond = example_inputs(model, batch)
  return jax.jit(model.init)(jax.random.key(seed), x, t, cond)["params"]


def _shapes(model):
  x, t, cond = example_inputs(model, 1)
  return jax.eval_shape(model.init, jax.random.key(0), x, t, cond)["params"]


def _random_params(model, seed=1, std=0.1):
  """Random values for every param (zero-init ones included), so every path matters."""
  rng = np.random.default_rng(seed)  # NumPy: eager jax.random compiles once per shape.
  return jax.tree.map(
    lambda p: jnp.asarray(std * rng.standard_normal(p.shape), p.dtype), _shapes(model)
  )


def _data(seed=0, b=2, s=8, c=3, length=5, width=16):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, s, s, c)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 1000, b), jnp.float32)
  text = jnp.asarray(rng.standard_normal((b, length, width)), jnp.float32)
  mask = jnp.asarray(np.arange(length)[None] < np.array([2, length])[:b, None], jnp.int32)
  return x, t, jnp.arange(b, dtype=jnp.int32) % 10, text, mask


def test_shapes_and_zero_init():
  model = DiT(**SMALL, num_classes=10)
  params = _init(model)
  x, t, labels, _, _ = _data()
  out = model.apply({"params": params}, x, t, {"label": labels})
  assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32  # learn_sigma: 2 C.
  # adaLN-Zero: the final layer is zero, so a fresh model predicts exactly 0.
  np.testing.assert_array_equal(out, 0.0)
  for block in ("blocks_0", "blocks_1"):
    np.testing.assert_array_equal(params[block]["adaLN_modulation_1"]["kernel"], 0.0)
  eps_only = DiT(**SMALL, num_classes=10, learn_sigma=False)
  out = eps_only.apply({"params": _random_params(eps_only)}, x, t, None)
  assert out.shape == (2, 8, 8, 3)


def test_initialisation_matches_reference_scheme():
  model = DiT(**{**SMALL, "hidden_size": 96, "num_heads": 4}, num_classes=10)
  params = _init(model)
  d, p, c = 96, 2, 3

  def within_xavier(w, fan_in, fan_out):
    bound = math.sqrt(6 / (fan_in + fan_out))
    return np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound

  # Patch embedding is xavier-uniform on the (D, C p p) matrix, as the reference's conv view.
  assert within_xavier(params["x_embedder"]["kernel"], c * p * p, d)
  assert within_xavier(params["blocks_0"]["attn"]["qkv"]["kernel"], d, 3 * d)
  assert within_xavier(params["blocks_0"]["mlp"]["fc1"]["kernel"], d, 4 * d)
  np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["bias"], 0.0)
  for w in (params["y_embedder"]["embedding"], params["t_embedder"]["mlp_0"]["kernel"]):
    assert np.std(w) == pytest.approx(0.02, rel=0.1)
  assert params["y_embedder"]["embedding"].shape == (11, d)  # + the null class.
  np.testing.assert_array_equal(params["final_layer"]["linear"]["kernel"], 0.0)

  pix = DiT(**PIXART)
  pp = _init(pix)
  np.testing.assert_array_equal(pp["blocks_0"]["cross_attn"]["proj"]["kernel"], 0.0)
  assert pp["blocks_0"]["scale_shift_table"].shape == (6, 48)
  assert np.std(pp["blocks_0"]["scale_shift_table"]) == pytest.approx(48**-0.5, rel=0.25)
  assert pp["y_embedding"].shape == (5, 16) and "adaLN_modulation_1" not in pp["blocks_0"]


def test_pos_embed_closed_form():
  dim, gh, gw = 16, 3, 5
  table = sincos_pos_embed_2d(dim, gh, gw)
  assert table.shape == (gh * gw, dim)
  for row, col in [(0, 0), (1, 4), (2, 3)]:
    token = row * gw + col
    for i in range(dim // 4):
      omega = 10000.0 ** (-i / (dim / 4))
      np.testing.assert_allclose(table[token, i], math.sin(col * omega), atol=1e-6)
      np.testing.assert_allclose(table[token, dim // 4 + i], math.cos(col * omega), atol=1e-6)
      np.testing.assert_allclose(table[token, dim // 2 + i], math.sin(row * omega), atol=1e-6)
  # PixArt: positions arange(n) / (n / base) / interpolation.
  scaled = sincos_pos_embed_2d(dim, 4, 4, base_size=2, interpolation=2.0)
  ref = sincos_pos_embed_2d(dim, 4, 4, base_size=None, interpolation=4.0)
  np.testing.assert_allclose(scaled, ref, atol=1e-6)


def test_timestep_embedding_closed_form():
  """[cos(t w_i), sin(t w_i)], w_i = 10000^(-i / (h - shift)), h = dim / 2 (DiT's
  timestep_embedding; shift 1 is diffusers' downscale_freq_shift); odd dims pad one zero."""
  t = np.array([0.0, 1.0, 37.5, 999.0], np.float32)
  for dim, shift in ((256, 0.0), (256, 1.0), (6, 0.0), (7, 0.0)):
    half = dim // 2
    w = 10000.0 ** (-np.arange(half) / (half - shift))
    args = t.astype(np.float64)[:, None] * w[None]
    want = np.concatenate([np.cos(args), np.sin(args), np.zeros((4, dim % 2))], axis=1)
    got = layers.timestep_embedding(jnp.asarray(t), dim, freq_shift=shift)
    assert got.shape == (4, dim) and got.dtype == jnp.float32
    # float32 arguments: t * w_i is off by up to ~1e3 * 6e-8, so sin / cos by <= 6e-5.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"dim={dim} shift={shift}")
  # The first frequency is 1 and the last 10000^(-(h-1)/h): the period is 2 pi ... 2 pi 10^4.
  emb = np.asarray(layers.timestep_embedding(jnp.asarray([math.pi / 2]), 256))
  np.testing.assert_allclose(emb[0, [0, 128]], [0.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(emb[0, 127], math.cos(math.pi / 2 * 10000 ** (-127 / 128)), atol=1e-6)


# Every block type, and the conditioning options (captions, size micro-conditioning, the LCM
# guidance embedding, diffusers' frequency shift, PixArt's position interpolation), against the
# NumPy reference; the "frozen" null caption has a test of its own below.
REFERENCE_CASES = {
  **{name: dict(SMALL, num_classes=10, block=name) for name in BLOCKS if name != "adaln_single"},
  "adaln_single": dict(PIXART, size_conditioning=True),
  "adaln_zero_captions_guidance": dict(
    PIXART, num_classes=10, block="adaln_zero", guidance_embedding=True, time_freq_shift=1.0,
    pe_interpolation=2.0,
  ),
}  # fmt: skip
# float32 model vs float64 reference, outputs O(1): measured <= 6e-5 (the float32 timestep
# arguments, see test_timestep_embedding_closed_form); a wrong operation is off by O(0.1).
REF_ATOL = 2e-4


def _reference_cond(fields, rng, b=2):
  cond = {"label": np.array([1, 7]), "drop": np.array([False, True])}
  if fields.get("caption_channels"):
    cond["text"] = rng.standard_normal((b, 5, 16)).astype(np.float32)
    cond["text_mask"] = np.array([[1, 1, 0, 0, 0], [1] * 5], np.int32)
  if fields.get("size_conditioning"):
    cond["resolution"] = np.array([[512, 512], [256, 1024]], np.float32)
    cond["aspect_ratio"] = np.array([[1.0], [0.25]], np.float32)
  if fields.get("guidance_embedding"):
    cond["guidance"] = np.array([1.5, 4.0], np.float32)
  return cond


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_model_matches_numpy_reference(case):
  """DiT == tests/numpy_dit.py on random params (every weight non-zero), at the training size
  and at a non-square 12x16 (positions rescaled to the 4x4 base grid, PixArt-style)."""
  fields = REFERENCE_CASES[case]
  model = DiT(**fields)
  params = _random_params(model)
  rng = np.random.default_rng(0)
  cond = _reference_cond(fields, rng)
  apply = jax.jit(lambda x, t, cond: model.apply({"params": params}, x, t, cond))
  t = np.array([3.0, 999.0], np.float32)
  for size in ((8, 8), (12, 16)):
    x = rng.standard_normal((2, *size, 3)).astype(np.float32)
    ref = numpy_dit.forward(jax.device_get(params), fields, x, t, cond)
    out = np.asarray(apply(x, t, cond))
    assert out.shape == ref.shape == (2, *size, 6)
    np.testing.assert_allclose(out, ref, atol=REF_ATOL, rtol=0, err_msg=f"{case} at {size}")
    assert np.abs(ref).max() > 100 * REF_ATOL  # The comparison is not of near-zero outputs.


def test_frozen_null_caption_matches_reference():
  """null_caption="frozen": dropped rows see the fixed table randn(key 0)(L, C) / sqrt(C)."""
  fields = dict(PIXART, null_caption="frozen")
  model = DiT(**fields)
  params = _random_params(model)
  x, t, _, text, mask = _data()
  null = np.asarray(layers.scale_shift_init(jax.random.key(0), (5, 16)))
  np.testing.assert_allclose(null.std(), 16**-0.5, rtol=0.3)
  cond = {"text": text, "text_mask": mask, "drop": jnp.array([True, False])}
  out = model.apply({"params": params}, x, t, cond)
  ref = numpy_dit.forward(params, fields, x, t, {**cond, "null_text": null})
  np.testing.assert_allclose(out, ref, atol=REF_ATOL, rtol=0)


def test_other_resolutions_use_rescaled_positions():
  """At 12x16 (grid 6x8, base 4) positions are arange(n) / (n / 4): rows step 2/3, columns 1/2."""
  d = 48
  table = sincos_pos_embed_2d(d, 6, 8, base_size=4)
  np.testing.assert_allclose(table, numpy_dit.pos_embed(d, 6, 8, base=4), atol=1e-6)
  w = 10000.0 ** (-np.arange(d // 4) / (d / 4))
  token = 5 * 8 + 3  # Row 5, column 3.
  np.testing.assert_allclose(table[token, : d // 4], np.sin(3 / 2 * w), atol=1e-6)
  np.testing.assert_allclose(table[token, d // 2 : 3 * d // 4], np.sin(5 * 2 / 3 * w), atol=1e-6)
  # And the model uses that table: its output at 12x16 is the reference's (which builds the
  # table from the definition), not that of an unscaled 6x8 grid.
  model = DiT(**SMALL, num_classes=10)
  params = _random_params(model)
  x = np.random.default_rng(1).standard_normal((1, 12, 16, 3)).astype(np.float32)
  cond = {"label": np.array([4])}
  out = np.asarray(model.apply({"params": params}, x, jnp.ones(1), cond))
  fields = dict(SMALL, num_classes=10)
  ref = numpy_dit.forward(params, fields, x, np.ones(1), cond)
  np.testing.assert_allclose(out, ref, atol=REF_ATOL, rtol=0)
  unscaled = numpy_dit.forward(params, dict(fields, input_size=12), x, np.ones(1), cond)
  assert np.abs(unscaled - ref).max() > 1e-2


def _gated_block(seed=0):
  """An adaLN-Zero block (D 32, 2 heads) with random params, tokens x and condition c."""
  block = blocks.AdaLNZeroBlock(hidden_size=32, num_heads=2)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
  shapes = jax.eval_shape(block.init, jax.random.key(0), x, c)["params"]
  params = jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), p.dtype), shapes)
  return block, params, x, c


def _zero_gate(params, index, d=32):
  """Zeroes modulation `index` of the 6 (shift, scale, gate of the attention, then the MLP)."""
  mod = dict(params["adaLN_modulation_1"])
  cols = slice(index * d, (index + 1) * d)
  mod["kernel"] = mod["kernel"].at[:, cols].set(0.0)
  mod["bias"] = mod["bias"].at[cols].set(0.0)
  return {**params, "adaLN_modulation_1": mod}


def _scaled(params, branch, factor=3.0):
  return {**params, branch: jax.tree.map(lambda p: factor * p, params[branch])}


def _block_reference(p, x, c, drop=()):
  """numpy_dit's adaLN-Zero block; the branches named in `drop` ("attn", "mlp") left out."""
  p, x, c = jax.device_get(p), np.asarray(x, np.float64), np.asarray(c, np.float64)
  mod = np.split(numpy_dit.linear(p["adaLN_modulation_1"], numpy_dit.silu(c)), 6, axis=-1)
  if "attn" not in drop:
    xn = numpy_dit.modulate(numpy_dit.layer_norm(x), mod[0], mod[1])
    x = x + mod[2][:, None] * numpy_dit.self_attention(p["attn"], xn, heads=2)
  if "mlp" not in drop:
    xn = numpy_dit.modulate(numpy_dit.layer_norm(x), mod[3], mod[4])
    x = x + mod[5][:, None] * numpy_dit.mlp(p["mlp"], xn)
  return x


def test_adaln_zero_gates():
  """A zeroed gate removes its branch: the block no longer depends on that branch's weights
  and equals the reference without that branch; both gates zeroed, it is the identity."""
  block, params, x, c = _gated_block()
  run = lambda p: np.asarray(block.apply({"params": p}, x, c))
  np.testing.assert_allclose(run(params), _block_reference(params, x, c), atol=1e-5)
  for gate, branch, other in ((2, "attn", "mlp"), (5, "mlp", "attn")):
    gated = _zero_gate(params, gate)
    out = run(gated)
    np.testing.assert_allclose(out, _block_reference(gated, x, c, drop=(branch,)), atol=1e-5)
    np.testing.assert_allclose(out, run(_scaled(gated, branch)), atol=1e-6, err_msg=branch)
    assert np.abs(out - run(_scaled(gated, other))).max() > 1e-2, other  # Still used.
    assert np.abs(out - run(params)).max() > 1e-2
  np.testing.assert_allclose(run(_zero_gate(_zero_gate(params, 2), 5)), x, atol=1e-6)


def test_label_dropout_is_cond_drop_and_null_class():
  """Label dropout is the caller's cond["drop"]; the model never drops on its own."""
  model = DiT(**SMALL, num_classes=10)
  params = _random_params(model)
  x, t, labels, _, _ = _data()

  def run(m=model, **cond):
    return m.apply({"params": params}, x, t, cond)

  null = run(label=jnp.full((2,), 10))
  np.testing.assert_allclose(run(label=labels, drop=jnp.ones(2, bool)), null, atol=1e-6)
  np.testing.assert_allclose(run(), null, atol=1e-6)  # No label -> the null class.
  mixed = run(label=labels, drop=jnp.array([True, False]))
  np.testing.assert_allclose(mixed[0], null[0], atol=1e-6)
  assert np.abs(mixed[1] - null[1]).max() > 1e-3
  np.testing.assert_allclose(mixed[1], run(label=labels)[1], atol=1e-6)
  np.testing.assert_array_equal(run(label=labels, drop=jnp.zeros(2, bool)), run(label=labels))
  # class_dropout_prob is the train loop's setting: even at 1.0 the built model drops nothing
  # and needs no "dropout" rng; the outputs do not depend on it.
  always = build_model(dict(SMALL, num_classes=10, class_dropout_prob=1.0))
  never = build_model(dict(SMALL, num_classes=10, class_dropout_prob=0.0))
  assert always == never == model
  out = run(always, label=labels)
  assert np.abs(out - null).max() > 1e-3
  np.testing.assert_array_equal(out, run(never, label=labels))
  with pytest.raises(TypeError, match="train"):
    model.apply({"params": params}, x, t, {"label": labels}, train=True)

  # Captions: dropped rows see the null caption, the others their own.
  pix = DiT(**PIXART)
  pp = _random_params(pix)
  _, _, _, text, mask = _data()
  null_text = jnp.broadcast_to(pp["y_embedding"][None], text.shape)
  apply = lambda cond: pix.apply({"params": pp}, x, t, {"text_mask": mask, **cond})
  mixed = apply({"text": text, "drop": jnp.array([True, False])})
  np.testing.assert_allclose(mixed[0], apply({"text": null_text})[0], atol=1e-6)
  np.testing.assert_allclose(mixed[1], apply({"text": text})[1], atol=1e-6)
  assert np.abs(mixed[1] - apply({"text": null_text})[1]).max() > 1e-3


def test_caption_null_and_mask():
  model = DiT(**PIXART)
  params = _random_params(model)
  x, t, _, text, mask = _data()
  apply = lambda cond: model.apply({"params": params}, x, t, cond)
  null_text = jnp.broadcast_to(params["y_embedding"][None], text.shape)
  dropped = apply({"text": text, "text_mask": mask, "drop": jnp.ones(2, bool)})
  np.testing.assert_allclose(dropped, apply({"text": null_text, "text_mask": mask}), atol=1e-6)
  # Masked-out tokens do not matter.
  noisy = text.at[0, 2:].set(100.0)
  np.testing.assert_allclose(
    apply({"text": noisy, "text_mask": mask}), apply({"text": text, "text_mask": mask}), atol=1e-5
  )
  # Frozen null caption: no parameter, a fixed table.
  frozen = DiT(**PIXART, null_caption="frozen")
  assert "y_embedding" not in _shapes(frozen)
  # Shorter captions are fine (the null caption is cut to length).
  short = model.apply({"params": params}, x, t, {"text": text[:, :3], "drop": jnp.ones(2, bool)})
  assert short.shape == (2, 8, 8, 6)


def test_bf16_close_to_fp32():
  model = DiT(**PIXART)
  params = _random_params(model)
  x, t, _, text, mask = _data()
  cond = {"text": text, "text_mask": mask}
  ref = model.apply({"params": params}, x, t, cond)
  out = DiT(**PIXART, dtype="bfloat16").apply({"params": params}, x, t, cond)
  assert out.dtype == jnp.float32
  err = float(jnp.abs(out - ref).max() / jnp.std(ref))
  assert 0 < err < BF16_REL_TOL, err


def test_remat_same_outputs_and_grads():
  model = DiT(**PIXART)
  params = _random_params(model)
  x, t, _, text, mask = _data()
  cond = {"text": text, "text_mask": mask}

  def loss(params, m):
    return jnp.mean(m.apply({"params": params}, x, t, cond) ** 2)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  l1, g1 = grad(params, model)
  l2, g2 = grad(params, DiT(**PIXART, remat=True))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g2)


def test_attention_implementations_agree():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3, 8)), jnp.float32) for n in (5, 7, 7))
  kv_mask = jnp.asarray([[1, 1, 1, 0, 0, 0, 0], [1] * 7], bool)
  # Reference: masked attention == attention over only the kept keys.
  ref0 = attention.dot_product_attention(q[:1], k[:1, :3], v[:1, :3], implementation="einsum")
  for impl in ("einsum", "xla"):
    out = attention.dot_product_attention(q, k, v, kv_mask[:, None, None], implementation=impl)
    np.testing.assert_allclose(out[:1], ref0, atol=1e-6)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    ref1 = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(out[1], ref1[1], atol=1e-5)

  model = DiT(**PIXART, attention_impl="einsum")
  params = _random_params(model)
  x, t, _, text, mask = _data()
  cond = {"text": text, "text_mask": mask}
  ref = model.apply({"params": params}, x, t, cond)
  impls = ["xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
  for impl in impls:
    dtype = "bfloat16" if impl == "cudnn" else "float32"
    out = DiT(**PIXART, attention_impl=impl, dtype=dtype).apply({"params": params}, x, t, cond)
    tol = BF16_REL_TOL * float(jnp.std(ref)) if impl == "cudnn" else 1e-5
    np.testing.assert_allclose(out, ref, atol=tol)
  if jax.default_backend() != "gpu":
    pytest.skip("cudnn attention needs an NVIDIA GPU (xla and einsum checked)")


def test_attention_matches_numpy_reference():
  """dot_product_attention (every implementation here) is softmax(q k^T / sqrt(d)) v with
  masked keys at -inf; SelfAttention reads its fused qkv as (3, heads, head_dim), and
  CrossAttention its kv as (2, heads, head_dim), as the reference code does."""
  rng = np.random.default_rng(3)
  q, k, v = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for n in (5, 7, 7))
  mask = np.array([[1, 1, 0, 1, 0, 0, 1], [1] * 7], bool)
  ref = numpy_dit.attention(q, k, v, mask[:, None, None])
  for impl in ("einsum", "xla"):
    out = attention.dot_product_attention(q, k, v, mask[:, None, None], implementation=impl)
    np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=impl)
  x = rng.standard_normal((2, 5, 24)).astype(np.float32)
  y = rng.standard_normal((2, 7, 24)).astype(np.float32)

  def random_init(module, *args):
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    return jax.tree.map(lambda p: (0.3 * rng.standard_normal(p.shape)).astype(np.float32), shapes)

  self_attn = attention.SelfAttention(num_heads=3)
  p = random_init(self_attn, x)
  np.testing.assert_allclose(
    self_attn.apply({"params": p}, x), numpy_dit.self_attention(p, x, heads=3), atol=1e-5
  )
  cross = attention.CrossAttention(num_heads=3)
  p = random_init(cross, x, y, mask)
  np.testing.assert_allclose(
    cross.apply({"params": p}, x, y, mask), numpy_dit.cross_attention(p, x, y, 3, mask), atol=1e-5
  )


def test_qk_norm_and_build_model():
  cfg = ml_collections.ConfigDict(dict(SMALL, num_classes=10, qk_norm=True))
  model = build_model(cfg)
  assert "q_norm" in _shapes(model)["blocks_0"]["attn"]
  with pytest.raises(ValueError, match="Unknown config.model fields \\['hiden_size'\\]"):
    build_model(dict(SMALL, hiden_size=3))
  with pytest.raises(
    ValueError, match="DiT accepts \\[.*'block'.*\\], plus \\['class_dropout_prob'\\]"
  ):
    build_model(dict(SMALL, hiden_size=3))


# The model section of configs/t2i_pixart.py's config.json before config.model.block existed.
OLD_PIXART_MODEL = dict(
  input_size=8, patch_size=2, in_channels=1, hidden_size=48, depth=2, num_heads=4,
  mlp_ratio=4.0, num_classes=0, class_dropout_prob=0.1, learn_sigma=False, adaln="single",
  conditioning="adaln_zero", caption_channels=16, caption_length=5, null_caption="learned",
  pe_interpolation=1.0, time_freq_shift=0.0, size_conditioning=False, qk_norm=False,
  attention_impl="xla", dtype="float32", remat=False, guidance_embedding=False,
)  # fmt: skip


def test_old_style_model_config_builds_the_same_model():
  old = build_model(ml_collections.ConfigDict(OLD_PIXART_MODEL))
  new_config = {k: v for k, v in OLD_PIXART_MODEL.items() if k not in ("adaln", "conditioning")}
  new = build_model(dict(new_config, block="adaln_single"))
  assert old == new and old.block == "adaln_single"
  old_params, new_params = _init(old), _init(new)
  assert jax.tree.structure(old_params) == jax.tree.structure(new_params)
  jax.tree.map(np.testing.assert_array_equal, old_params, new_params)
  params = _random_params(new)
  x, t, _, text, mask = _data(c=1)
  cond = {"text": text, "text_mask": mask, "drop": jnp.array([True, False])}
  np.testing.assert_array_equal(
    old.apply({"params": params}, x, t, cond), new.apply({"params": params}, x, t, cond)
  )
  # Every old (adaln, conditioning) pair, and the keys left out (the old defaults).
  pairs = {("zero", "adaln_zero"): "adaln_zero", ("single", "adaln_zero"): "adaln_single"}
  pairs.update({("zero", "adaln"): "adaln", ("zero", "cross_attn"): "cross_attn"})
  pairs[("zero", "in_context")] = "in_context"
  for (adaln, conditioning), block in pairs.items():
    old = build_model(dict(SMALL, adaln=adaln, conditioning=conditioning, class_dropout_prob=0.1))
    assert old == DiT(**SMALL, block=block)
  assert build_model(dict(SMALL, adaln="single")) == DiT(**SMALL, block="adaln_single")
  assert build_model(dict(SMALL, conditioning="in_context")).block == "in_context"
  # An old key that agrees with block is fine (a converter's kwargs over a new-style config).
  assert build_model(dict(SMALL, adaln="zero", block="adaln_zero")).block == "adaln_zero"


@pytest.mark.parametrize(
  "config,match",
  [
    (dict(adaln="double"), r"adaln must be 'zero' or 'single', got 'double'"),
    (dict(conditioning="film"), r"conditioning must be one of \['adaln', .*got 'film'"),
    (dict(adaln="single", conditioning="in_context"), r"'in_context' needs adaln='zero'"),
    (
      dict(adaln="single", block="adaln_zero"),
      r"block='adaln_zero' contradicts .*block='adaln_single'",
    ),
  ],
)
def test_old_style_model_config_errors(config, match):
  with pytest.raises(ValueError, match=match):
    build_model(dict(SMALL, **config))


# The production block types run by default; the Figure-5 ablation types with -m slow (their
# maths is checked by default against tests/numpy_dit.py in test_model_matches_numpy_reference).
@pytest.mark.parametrize(
  "name",
  [n if n in ("adaln_zero", "adaln_single") else pytest.param(n, marks=pytest.mark.slow)
   for n in sorted(BLOCKS)],
)  # fmt: skip
def test_every_block_type_builds_initialises_and_runs(name):
  """The registry's contract: each block type inits, runs, and remats to the same grads."""
  captions = BLOCKS[name].captions
  kwargs = dict(SMALL, num_classes=10, block=name, caption_channels=16 if captions else 0)
  model = build_model(dict(kwargs, caption_length=5))
  params = _init(model)
  assert {f"blocks_{i}" for i in range(2)} | {"final_layer", "x_embedder"} <= set(params)
  x, t, labels, text, mask = _data()
  cond = {"label": labels} | ({"text": text, "text_mask": mask} if captions else {})
  out = model.apply({"params": params}, x, t, cond)
  assert out.shape == (2, 8, 8, 6) and np.all(np.isfinite(out))

  params = _random_params(model)

  def loss(params, m):
    return jnp.mean(m.apply({"params": params}, x, t, cond) ** 2)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (l1, g1), (l2, g2) = grad(params, model), grad(params, model.clone(remat=True))
  assert l1 > 0
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g2)


@pytest.mark.parametrize(
  "kwargs,x_shape,cond,match",
  [
    ({}, (2, 7, 8, 3), {}, r"\(H, W\) = \(7, 8\) must be divisible by patch_size=2"),
    ({}, (2, 8, 8, 4), {}, r"x has 4 channels, expected in_channels=3"),
    ({}, (8, 8, 3), {}, r"x must be \(B, H, W, C\), got shape \(8, 8, 3\)"),
    (PIXART, (2, 8, 8, 3), {"text": (2, 5, 12)}, r"\(2, L, 16\), got \(2, 5, 12\)"),
    (
      PIXART,
      (2, 8, 8, 3),
      {"text": (2, 5, 16), "text_mask": (2, 4)},
      r"text_mask'\] must be \(B, L\) = \(2, 5\).*got \(2, 4\)",
    ),
    (PIXART, (2, 8, 8, 3), {"text": (2, 6, 16)}, r"6 tokens, more than caption_length=5"),
    ({"block": "double"}, (2, 8, 8, 3), {}, r"block must be one of \['adaln', .*got 'double'"),
    (
      {"block": "in_context", "caption_channels": 16},
      (2, 8, 8, 3),
      {},
      r"block='in_context' takes no caption.*\['adaln_single', 'adaln_zero'\]",
    ),
  ],
)
def test_bad_input(kwargs, x_shape, cond, match):
  model = DiT(**{**SMALL, "num_classes": 0, **kwargs})
  cond = {k: jnp.ones(v) for k, v in cond.items()}
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), jnp.ones(x_shape), jnp.ones(x_shape[:1]), cond)
