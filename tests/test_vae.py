"""Parity of dit.models.vae with diffusers' AutoencoderKL (float32, CPU), plus bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dit.models import vae as vae_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

WEIGHTS = "diffusion_pytorch_model.safetensors"
TOL = 1e-4

# Tiny stand-ins for the SD 1.x/2.x VAE (4 channels, quant convs) and the SD3/Flux VAE
# (16 channels, no quant convs, shift_factor).
VARIANTS = {
  "sd": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4),
  "flux": dict(
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
  ),
}


def _make_torch_vae(name, directory):
  kwargs = VARIANTS[name]
  n = len(kwargs["block_out_channels"])
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * n,
    up_block_types=("UpDecoderBlock2D",) * n,
    norm_num_groups=4,
    sample_size=32,
    **kwargs,
  ).eval()
  with torch.no_grad():  # Perturb every tensor so that norms' scales and biases matter too.
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
  """(torch model, model dir, (module, params, config)) for each variant."""
  directory = str(tmp_path_factory.mktemp(request.param))
  model = _make_torch_vae(request.param, directory)
  return model, directory, vae_lib.load_vae(directory)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("sd_src"))
  _make_torch_vae("sd", directory)
  return directory


def _nchw(x):
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def _nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


def _images(batch=2, size=32, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _assert_close(ours, ref):
  np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def test_config_from_diffusers(pair):
  model, _, (_, _, config) = pair
  assert config.block_out_channels == tuple(model.config.block_out_channels)
  assert config.latent_channels == model.config.latent_channels
  assert config.shift_factor == (model.config.shift_factor or 0.0)
  assert config.downsample_factor == 2 ** (len(config.block_out_channels) - 1)


def test_encode_decode_parity(pair):
  model, _, (module, params, config) = pair
  x = _images()
  # jit: one compilation is much faster than JAX's op-by-op dispatch on CPU.
  encode = jax.jit(lambda p, x: module.apply(p, x, method=vae_lib.AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: module.apply(p, z, method=vae_lib.AutoencoderKL.decode))
  mean, logvar = encode(params, x)
  f = config.downsample_factor
  z = np.random.RandomState(1).randn(2, 32 // f, 32 // f, config.latent_channels)
  z = z.astype(np.float32)
  out = decode(params, z)
  with torch.no_grad():
    post = model.encode(_nchw(x)).latent_dist
    ref_out = _nhwc(model.decode(_nchw(z)).sample)
  assert mean.shape == (2, 32 // f, 32 // f, config.latent_channels)
  _assert_close(mean, _nhwc(post.mean))
  _assert_close(logvar, _nhwc(post.logvar))
  assert out.shape == (2, 32, 32, 3)
  _assert_close(out, ref_out)


@pytest.mark.parametrize("pair", ["flux"], indirect=True)  # The variant with a shift.
def test_latent_helpers_apply_scale_shift_and_sample(pair):
  """VAE.encode/decode are the jitted encode_to_latents/decode_latents."""
  model, _, (module, params, config) = pair
  vae = vae_lib.VAE(module, params, config)
  x = _images(seed=2)
  with torch.no_grad():
    post = model.encode(_nchw(x)).latent_dist
  mean, std = _nhwc(post.mean), _nhwc(post.std)
  scale, shift = model.config.scaling_factor, model.config.shift_factor or 0.0

  lat = vae.encode(x)
  _assert_close(lat, (mean - shift) * scale)

  key = jax.random.key(3)
  sampled = vae.encode(x, key)
  eps = np.asarray(jax.random.normal(key, mean.shape))
  _assert_close(sampled, (mean + std * eps - shift) * scale)
  other = vae.encode(x, jax.random.key(4))
  assert np.abs(np.asarray(sampled) - np.asarray(other)).max() > 1e-3

  images = vae.decode(lat)
  with torch.no_grad():
    ref = model.decode(_nchw(lat) / scale + shift).sample.clamp(-1, 1)
  assert images.shape == x.shape
  _assert_close(images, _nhwc(ref))


def test_tiled_decode_matches_diffusers(sd_dir):
  model = diffusers.AutoencoderKL.from_pretrained(sd_dir).eval()
  module, params, config = vae_lib.load_vae(sd_dir)
  f = config.downsample_factor
  latents = np.random.RandomState(5).randn(1, 12, 12, config.latent_channels).astype(np.float32)
  # diffusers tiles with tile_latent_min_size and blends 25% overlaps; 12 = tiles at 0 and 6.
  model.use_tiling = True
  model.tile_latent_min_size, model.tile_sample_min_size = 8, 8 * f
  try:
    with torch.no_grad():
      scale, shift = model.config.scaling_factor, model.config.shift_factor or 0.0
      ref = model.tiled_decode(_nchw(latents) / scale + shift).sample.clamp(-1, 1)
      full = model.decode(_nchw(latents[:, :8, :8]) / scale + shift).sample.clamp(-1, 1)
  finally:
    model.use_tiling = False
  tiled = vae_lib.decode_latents(module, params, latents, tile_size=8)
  assert tiled.shape == (1, 12 * f, 12 * f, 3)
  _assert_close(tiled, _nhwc(ref))
  # A tile that covers the whole latent is the plain decode.
  one_tile = vae_lib.decode_latents(module, params, latents[:, :8, :8], tile_size=8)
  _assert_close(one_tile, _nhwc(full))


def test_legacy_attention_names_load(sd_dir, tmp_path):
  """Old checkpoints name attention query/key/value/proj_attn, sometimes with 1x1-conv shapes."""
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  weights = {}
  for name, w in load_file(os.path.join(sd_dir, WEIGHTS)).items():
    for new, old in legacy.items():
      if f".attentions.0.{new}." in name:
        name = name.replace(f".{new}.", f".{old}.")
        w = w[:, :, None, None] if w.ndim == 2 else w
    weights[name] = w
  assert "encoder.mid_block.attentions.0.query.weight" in weights
  shutil.copy(os.path.join(sd_dir, "config.json"), tmp_path)
  save_file(weights, str(tmp_path / WEIGHTS))
  _, params, _ = vae_lib.load_vae(str(tmp_path))
  _, ref_params, _ = vae_lib.load_vae(sd_dir)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)


# ----------------------------------------------------------------------------- bad input


def _copy_with(sd_dir, tmp_path, edit):
  weights = load_file(os.path.join(sd_dir, WEIGHTS))
  edit(weights)
  shutil.copy(os.path.join(sd_dir, "config.json"), tmp_path)
  save_file(weights, str(tmp_path / WEIGHTS))
  return str(tmp_path)


def test_missing_files_are_listed(sd_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    vae_lib.load_vae(str(tmp_path))
  shutil.copy(os.path.join(sd_dir, "config.json"), tmp_path)
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    vae_lib.load_vae(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    vae_lib.load_vae(str(tmp_path / "nope"))


def test_missing_tensor_is_named(sd_dir, tmp_path):
  d = _copy_with(sd_dir, tmp_path, lambda w: w.pop("decoder.conv_out.weight"))
  with pytest.raises(ValueError, match=r"missing keys.*decoder\.conv_out\.weight"):
    vae_lib.load_vae(d)


def test_misshaped_tensor_is_named(sd_dir, tmp_path):
  def edit(w):
    w["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)

  with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight: expected \(8, 3, 3, 3\)"):
    vae_lib.load_vae(_copy_with(sd_dir, tmp_path, edit))


def test_wrong_dtype_tensor_is_named(sd_dir, tmp_path):
  def edit(w):
    w["quant_conv.bias"] = np.zeros((8,), np.int64)

  with pytest.raises(ValueError, match=r"quant_conv\.bias: int64"):
    vae_lib.load_vae(_copy_with(sd_dir, tmp_path, edit))


def test_unsupported_config_is_rejected(sd_dir, tmp_path):
  with open(os.path.join(sd_dir, "config.json")) as f:
    cfg = json.load(f)
  with pytest.raises(ValueError, match="down_block_types"):
    vae_lib.VAEConfig.from_diffusers({**cfg, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
  with pytest.raises(ValueError, match="act_fn"):
    vae_lib.VAEConfig.from_diffusers({**cfg, "act_fn": "gelu"})
  with pytest.raises(ValueError, match="norm_num_groups"):
    vae_lib.VAEConfig.from_diffusers({**cfg, "norm_num_groups": 3})


def test_bad_images_and_latents(sd_dir):
  module, params, config = vae_lib.load_vae(sd_dir)
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\).*\(1, 32, 32, 4\)"):
    vae_lib.encode_to_latents(module, params, np.zeros((1, 32, 32, 4), np.float32))
  with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 2"):
    vae_lib.encode_to_latents(module, params, np.zeros((1, 33, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"latents \(B, h, w, 4\)"):
    vae_lib.decode_latents(module, params, np.zeros((1, 8, 8, 16), np.float32))
  with pytest.raises(ValueError, match="NHWC"):
    vae_lib.VAE(module, params, config).encode(np.zeros((1, 3, 32, 32), np.float32))
