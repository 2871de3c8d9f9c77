"""Flux (dit/models/flux.py): parity with diffusers' FluxTransformer2DModel, its converter, the
conventions (time, guidance, null caption, pooled text) and configs/t2i_flux.py end to end.

diffusers' model sees packed tokens (patch 1, in_channels = 4 latent channels x 4); the tests
pack and unpack the latents with the Flux pipeline's own `_pack_latents` / `_unpack_latents`
and build its ids with `_prepare_latent_image_ids`, as FluxPipeline does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES

from dit import checkpoint, generate
from dit.diffusion import flow as flow_lib
from dit.diffusion import flow_samplers
from dit.models import convert, flux, rope
from dit.models import dit as dit_model

try:
  import diffusers
  import torch
  from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
except ImportError:  # The core install: the torch-free tests still run.
  torch = diffusers = FluxPipeline = None

needs_torch = pytest.mark.skipif(
  torch is None, reason="parity with diffusers needs the torch extra (pip install 'dit[torch]')"
)

TOL = 1e-4
B, H, W, C, L = 2, 8, 6, 4, 5  # A non-square latent: rows and columns cannot be swapped.
TEXT, POOLED = 16, 12
TINY = dict(  # A tiny Flux of our own (no torch): head dim 16 = 4 + 6 + 6.
  input_size=8, patch_size=2, in_channels=C, hidden_size=32, depth=1, single_depth=1,
  num_heads=2, axes_dim=(4, 6, 6), caption_channels=TEXT, caption_length=8, pooled_channels=0,
  null_caption="learned",
)  # fmt: skip


def _tiny_diffusers(guidance: bool, seed: int = 0):
  model = diffusers.FluxTransformer2DModel(
    patch_size=1,
    in_channels=4 * C,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TEXT,
    pooled_projection_dim=POOLED,
    guidance_embeds=guidance,
    axes_dims_rope=(4, 6, 6),
  )
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # Random everything (diffusers zero-inits nothing here, but be sure).
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.1)
  return model.eval()


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, H, W, C)).astype(np.float32)
  text = rng.standard_normal((B, L, TEXT)).astype(np.float32)
  pooled = rng.standard_normal((B, POOLED)).astype(np.float32)
  return x, text, pooled


def _diffusers_forward(model, x, sigma, text, pooled, guidance=None):
  """The pipeline's call: NHWC latents packed, sigma in [0, 1], unpacked back to NHWC."""
  b, h, w, c = x.shape
  latents = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  packed = FluxPipeline._pack_latents(latents, b, c, h, w)
  img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
  with torch.no_grad():
    out = model(
      packed,
      encoder_hidden_states=torch.from_numpy(text),
      pooled_projections=torch.from_numpy(pooled),
      timestep=torch.as_tensor(sigma, dtype=torch.float32),
      img_ids=img_ids,
      txt_ids=torch.zeros(text.shape[1], 3),
      guidance=None if guidance is None else torch.as_tensor(guidance, dtype=torch.float32),
    ).sample
  # _unpack_latents takes the image size in pixels (vae_scale_factor 8).
  return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).numpy().transpose(0, 2, 3, 1)


@needs_torch
def test_rope_matches_flux_pos_embed():
  """rope.py on Flux's ids == diffusers' FluxPosEmbed + apply_rotary_emb (to 0.0)."""
  from diffusers.models.embeddings import apply_rotary_emb
  from diffusers.models.transformers.transformer_flux import FluxPosEmbed

  ids = flux.token_positions(L, 3, 4)
  image_ids = FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float64).numpy()
  np.testing.assert_array_equal(ids, np.concatenate([np.zeros((L, 3)), image_ids]))
  cos, sin = rope.rope_angles(ids, (4, 6, 6), 10000.0)
  ref_cos, ref_sin = FluxPosEmbed(10000, [4, 6, 6])(torch.from_numpy(ids))
  np.testing.assert_array_equal(cos, ref_cos.numpy())
  np.testing.assert_array_equal(sin, ref_sin.numpy())
  q = np.random.default_rng(0).standard_normal((1, L + 12, 2, 16)).astype(np.float32)
  ref = apply_rotary_emb(torch.from_numpy(q), (ref_cos, ref_sin), sequence_dim=1).numpy()
  np.testing.assert_array_equal(rope.apply_rope(jnp.asarray(q), cos, sin), ref)


@needs_torch
@pytest.mark.parametrize("guidance", [False, True])
def test_diffusers_parity(tmp_path, guidance):
  model = _tiny_diffusers(guidance)
  model.save_pretrained(tmp_path, safe_serialization=True)
  params, kwargs = convert.convert_flux(str(tmp_path), input_size=H, caption_length=L)
  assert kwargs["in_channels"] == C and kwargs["patch_size"] == 2
  assert kwargs["guidance_embedding"] == guidance and kwargs["null_caption"] == "zeros"
  x, text, pooled = _inputs()
  sigma = np.array([0.25, 0.875], np.float32)  # Exact in float32, times 1000 too.
  w = np.array([3.5, 1.0], np.float32) if guidance else None
  ref = _diffusers_forward(model, x, sigma, text, pooled, w)
  cond = {"text": jnp.asarray(text), "pooled": jnp.asarray(pooled)}
  if guidance:
    cond["guidance"] = jnp.asarray(w)
  # Our time input is the model time 1000 sigma (config.flow.time_scale); diffusers scales
  # inside. A text mask changes nothing: diffusers' Flux attends to every text token.
  cond["text_mask"] = jnp.asarray([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
  model_t = jnp.asarray(1000.0 * sigma)
  ours = jax.jit(flux.Flux(**kwargs).apply)({"params": params}, jnp.asarray(x), model_t, cond)
  assert ours.shape == (B, H, W, C) and ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
  if guidance:  # The scanned, rematerialised stacks compute the same (same param layout).
    fast = flux.Flux(**kwargs, scan=True, remat=True)
    out = jax.jit(fast.apply)({"params": params}, jnp.asarray(x), model_t, cond)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


@needs_torch
def test_bad_checkpoint(tmp_path):
  model = _tiny_diffusers(True)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  cfg = dict(model.config)
  del sd["single_transformer_blocks.1.proj_mlp.bias"]
  sd["transformer_blocks.0.attn.norm_added_q.weight"] = np.zeros(8, np.float32)
  sd["transformer_blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    flux.diffusers_params(sd, cfg, "tiny")
  msg = str(e.value)
  assert "missing keys (1): ['single_transformer_blocks.1.proj_mlp.bias']" in msg
  assert "unexpected keys (1): ['transformer_blocks.0.attn.extra.weight']" in msg
  assert "transformer_blocks.0.attn.norm_added_q.weight: expected (16,), got (8,)" in msg
  with pytest.raises(ValueError, match="patch_size=1.*got patch_size=2"):
    flux.diffusers_params(sd, {**cfg, "patch_size": 2}, "tiny")
  with pytest.raises(FileNotFoundError):
    convert.convert_flux(str(tmp_path / "missing"))


def _params(model, seed=0):
  """Random N(0, 0.1^2) params: the zero-initialised modulations would hide every term."""
  rng = np.random.default_rng(seed)
  x, t, cond = model.example_inputs(1)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, cond))["params"]
  return jax.tree.map(
    lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32), shapes
  )


def test_build_model_and_bad_fields():
  model = dit_model.build_model({"arch": "flux", **TINY, "class_dropout_prob": 0.1})
  assert isinstance(model, flux.Flux) and model.out_channels == C and not model.learn_sigma
  x, t, cond = dit_model.example_inputs(model, 2)
  assert x.shape == (2, 8, 8, C) and cond["text"].shape == (2, 8, TEXT) and "pooled" not in cond
  assert set(dit_model.abstract_params(model)) == {
    "img_in", "txt_in", "time_in", "vector_in", "y_embedding", "double_blocks", "single_blocks",
    "final_layer",
  }  # fmt: skip
  with pytest.raises(ValueError, match=r"Unknown config.model fields \['block'\].*Flux accepts"):
    dit_model.build_model({"arch": "flux", **TINY, "block": "adaln_zero"})
  bad = {
    "axes_dim": ((4, 6, 4), r"axes_dim=\(4, 6, 4\).*summing to the head dimension.*= 16"),
    "num_heads": (3, "hidden_size=32 is not divisible by num_heads=3"),
    "caption_channels": (0, "Flux needs a text input: caption_channels must be > 0, got 0"),
    "null_caption": ("frozen", "null_caption must be one of.*'frozen'"),
    "num_classes": (10, "num_classes must be 0, got 10"),
    "learn_sigma": (True, "learn_sigma must be False"),
  }
  for key, (value, match) in bad.items():
    with pytest.raises(ValueError, match=match):
      flux.build_model({**TINY, key: value})


def test_bad_inputs():
  model = flux.Flux(**{**TINY, "pooled_channels": POOLED, "guidance_embedding": True})
  x, t, cond = model.example_inputs(2)
  params = _params(model)
  apply = jax.jit(model.apply)  # Bad inputs fail while tracing.
  run = lambda x=x, t=t, **c: apply({"params": params}, x, t, {**cond, **c})
  assert run().shape == x.shape
  cases = [
    (dict(x=x[..., :2]), "x has 2 channels, expected in_channels=4"),
    (dict(x=x[:, :7]), r"\(H, W\) = \(7, 8\) must be divisible by patch_size=2"),
    (dict(t=t[:1]), r"t must have shape \(B,\) = \(2,\), got \(1,\)"),
    (dict(text=cond["text"][..., :3]), r"= \(2, L, 16\), got \(2, 8, 3\)"),
    (dict(text=jnp.zeros((2, 9, TEXT))), "9 tokens, more than caption_length=8"),
    (dict(text_mask=jnp.ones((2, 3))), r"cond\['text_mask'\] must have shape \(2, 8\)"),
    (dict(pooled=jnp.zeros((2, 5))), r"cond\['pooled'\] must have shape \(2, 12\), got \(2, 5\)"),
    (dict(drop=jnp.zeros(3, bool)), r"cond\['drop'\] must have shape \(2,\)"),
  ]  # fmt: skip
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      run(**kwargs)
  for key, match in [
    ("text", r"Flux needs cond\['text'\]"),
    ("pooled", r"pooled_channels > 0 needs cond\['pooled'\] of shape \(2, 12\)"),
    ("guidance", r"guidance_embedding=True needs cond\['guidance'\] of shape \(2,\)"),
  ]:
    with pytest.raises(ValueError, match=match):
      apply({"params": params}, x, t, {k: v for k, v in cond.items() if k != key})
  plain = flux.Flux(**TINY)
  with pytest.raises(ValueError, match=r"cond\['pooled'\] was given but pooled_channels=0"):
    plain.apply({"params": _params(plain)}, x, t, cond)


@pytest.mark.slow  # About 11 s.
def test_null_caption_and_pooled_mean():
  """Dropped rows see the null caption (learned: y_embedding, its mean pooled; zeros: zeros);
  with pooled_channels=0 the pooled vector is the text's masked mean, the same function as a
  model given that mean as cond["pooled"]."""
  model = flux.Flux(**TINY)
  params = _params(model)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, C)), jnp.float32)
  t = jnp.asarray([10.0, 500.0, 990.0])
  text = jnp.asarray(rng.standard_normal((3, 6, TEXT)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
  jitted = {}  # One jit per model: calls with the same cond keys compile once.
  apply = lambda m, p, c: jitted.setdefault(m, jax.jit(m.apply))({"params": p}, x, t, c)
  out = apply(model, params, {"text": text, "text_mask": mask})
  # The masked mean, given as the pooled vector of a model whose pooled input is as wide.
  wide = model.clone(pooled_channels=TEXT)
  m = mask[..., None].astype(jnp.float32)
  mean = (text * m).sum(1) / m.sum(1)
  np.testing.assert_allclose(apply(wide, params, {"text": text, "pooled": mean}), out, atol=1e-5)
  # Masked tokens are still attended to (diffusers' Flux), so they change the output.
  other = text.at[1, 4].set(5.0)
  changed = apply(model, params, {"text": other, "text_mask": mask})
  assert np.abs(changed[1] - out[1]).max() > 1e-4 and np.abs(changed[0] - out[0]).max() < 1e-6
  # drop: row 0 and 2 see the learned null caption, whatever their text and mask.
  drop = jnp.asarray([True, False, True])
  dropped = apply(model, params, {"text": text, "text_mask": mask, "drop": drop})
  null = jnp.broadcast_to(params["y_embedding"][:6], text.shape)
  explicit = apply(model, params, {"text": null})
  np.testing.assert_allclose(dropped[::2], explicit[::2], atol=1e-5)
  np.testing.assert_allclose(dropped[1], out[1], atol=1e-6)
  # With a pooled input, dropped rows' pooled vector is zero.
  dropped = apply(wide, params, {"text": text, "pooled": mean, "drop": drop})
  explicit = apply(wide, params, {"text": null, "pooled": jnp.zeros_like(mean)})
  np.testing.assert_allclose(dropped[::2], explicit[::2], atol=1e-5)
  zeros = model.clone(null_caption="zeros")
  del params["y_embedding"]
  dropped = apply(zeros, params, {"text": text, "drop": drop})
  explicit = apply(zeros, params, {"text": jnp.zeros_like(text)})
  np.testing.assert_allclose(dropped[::2], explicit[::2], atol=1e-5)


@pytest.mark.slow  # Over 20 s on 2 cores; the fast tests cover the parts.
@needs_torch
def test_converted_flux_samples_as_diffusers(tmp_path):
  """`dit.models.convert --kind=flux` -> a workdir; the generate API samples it with a text
  embedding, and its Euler steps are diffusers' model's at the same flow times (sigma) with
  the guidance scale as the model's input."""
  from test_convert import _command

  model = _tiny_diffusers(True, seed=2)
  model.save_pretrained(tmp_path / "flux" / "transformer", safe_serialization=True)
  workdir = str(tmp_path / "run")
  r = _command("dit.models.convert", "--kind=flux", f"--source={tmp_path / 'flux'}",
               f"--workdir={workdir}", f"--caption_length={L}", f"--input_size={H}",
               "--noprogress")  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  config = checkpoint.read_config(workdir)
  assert config.model.arch == "flux" and config.model.caption_length == L
  assert config.flow.dynamic_shift and config.flow.time_scale == 1000.0
  assert config.model.input_size == H and config.model.in_channels == C
  ours, params = generate.load_params(config, workdir)
  x_T = np.asarray(jax.random.normal(jax.random.key(0), (B, H, H, C)))
  _, text, pooled = _inputs(3)
  cond = {"text": jnp.asarray(text), "pooled": jnp.asarray(pooled)}
  steps, w = 3, 2.5
  settings = generate.sampler_settings(config, sampler="euler", steps=steps)
  flow = flow_lib.from_config(config)
  denoise = generate.make_denoise(ours, params, cond, w, B)  # A guidance input, no CFG pass.
  got = flow_samplers.sample(denoise, jnp.asarray(x_T), jax.random.key(1), flow, settings)
  tau, model_t = flow_samplers.flow_times(flow, settings)
  np.testing.assert_allclose(model_t, 1000.0 * tau, rtol=1e-6)
  x = x_T
  for i in range(steps):
    tau_next = tau[i + 1] if i + 1 < steps else 0.0
    v = _diffusers_forward(model, x, np.full(B, tau[i]), text, pooled, np.full(B, w))
    x = x + (tau_next - tau[i]) * v
  np.testing.assert_allclose(got, x, atol=1e-4, rtol=0)
  images = generate.generate(config, ours, params, cond, jax.random.key(0), B, cfg_scale=w,
                             sampler="euler", steps=2)  # fmt: skip
  assert images.shape == (B, H, H, C) and bool(jnp.isfinite(images).all())


@pytest.mark.slow  # About 25 s; the default run's budget.
def test_t2i_flux_config_trains_and_samples(tmp_path, monkeypatch, capsys):
  """configs/t2i_flux.py, tiny: two train steps through dit.train, a prompt through dit.sample."""
  from test_early_checks import run_command_here

  from dit import sample, train

  tiny = {
    **TINY_OVERRIDES, "total_steps": 2, "ckpt_every": 2, "model.single_depth": 1,
    "model.axes_dim": "(4,6,6)", "text.demo_dim": 16, "text.demo_layers": 1,
    "text.demo_heads": 2,
  }  # fmt: skip
  args = [f"--config={ROOT / 'configs/t2i_flux.py'}", f"--workdir={tmp_path}"]
  args += [f"--config.{k}={v}" for k, v in tiny.items()]
  code, _, err = run_command_here(train, *args, monkeypatch=monkeypatch, capsys=capsys)
  assert code == 0, err[-2000:]
  config = checkpoint.read_config(str(tmp_path))
  assert config.model.arch == "flux" and config.flow.dynamic_shift
  out = tmp_path / "seven.png"
  code, _, err = run_command_here(
    sample, f"--workdir={tmp_path}", f"--out={out}", "--num=2", "--steps=2",
    "--prompt=a handwritten digit seven", monkeypatch=monkeypatch, capsys=capsys,
  )  # fmt: skip
  assert code == 0 and out.exists(), err[-2000:]
