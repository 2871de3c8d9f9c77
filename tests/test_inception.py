"""FID InceptionV3: parity with a re-typed pytorch-fid network, weight loading, the stats CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest

from dit.models import inception

torch = pytest.importorskip("torch")
from torch_fid_inception import FIDInception3, randomize_  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Random FID Inception in torch, saved as a pytorch-fid style state dict."""
  torch.manual_seed(0)
  model = FIDInception3().eval()
  randomize_(model, seed=0)
  path = str(tmp_path_factory.mktemp("inception") / inception.FID_WEIGHTS_FILE)
  torch.save(model.state_dict(), path)
  return model, path


@pytest.fixture(scope="module")
def variables(reference):
  return inception.load_inception_variables(reference[1])


@pytest.fixture(scope="module")
def feature_fn(variables):
  return inception.make_feature_fn(variables, batch_size=2)


def _torch_features(model, images):
  """images (N, H, W, C) in [-1, 1] -> pytorch-fid inputs in [0, 1], NCHW."""
  x = torch.from_numpy((np.asarray(images, np.float32) + 1.0) / 2.0).permute(0, 3, 1, 2)
  with torch.no_grad():
    pool, logits = model(x)
  return pool.numpy(), logits.numpy(), model.fc.weight.detach().numpy()


def test_parity_with_pytorch_fid_network(reference, feature_fn):
  model, _ = reference
  # 3 images with batch_size 2 also exercises the padded last batch.
  images = np.random.RandomState(0).uniform(-1, 1, (3, 32, 40, 3)).astype(np.float32)
  out = feature_fn(images)
  pool, logits, w = _torch_features(model, images)
  assert out["pool"].shape == (3, inception.FEATURE_DIM)
  assert out["logits"].shape == (3, inception.NUM_LOGITS)
  assert np.abs(pool).mean() > 0.1  # Features of a sensible size, so 1e-4 means something.
  np.testing.assert_allclose(out["pool"], pool, atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["logits"], logits, atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["logits_unbiased"], pool @ w.T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(32, 40), (512, 333)])
def test_resize_matches_torch_interpolate(size):
  x = np.random.RandomState(0).randn(1, *size, 2).astype(np.float32)
  want = torch.nn.functional.interpolate(
    torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False
  )
  got = np.asarray(inception.resize_to_inception(x))
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_grey_images_are_repeated_to_rgb(feature_fn):
  grey = np.random.RandomState(1).uniform(-1, 1, (2, 32, 40, 1)).astype(np.float32)
  np.testing.assert_allclose(
    feature_fn(grey)["pool"], feature_fn(np.repeat(grey, 3, axis=-1))["pool"], atol=1e-6
  )


def test_safetensors_and_npz_hold_the_same_weights(reference, variables, tmp_path):
  """The torch-free routes: the .pth's tensors as .safetensors / .npz (no num_batches_tracked)."""
  import jax
  from safetensors.torch import save_file

  model, _ = reference
  state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
  save_file(state, str(tmp_path / "w.safetensors"))
  np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in state.items()})
  for path in (tmp_path / "w.safetensors", tmp_path / "w.npz"):
    got = inception.load_inception_variables(str(path))
    assert jax.tree.structure(got) == jax.tree.structure(variables)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), got, variables)))
  # Layouts: torch OIHW conv -> Flax HWIO; torch Linear (out, in) -> Flax (in, out).
  w = model.Conv2d_1a_3x3.conv.weight.detach().numpy()
  np.testing.assert_array_equal(
    variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"], w.transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], model.fc.weight.detach().T)


def test_bad_weight_files(reference, tmp_path):
  model, _ = reference
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    inception.load_inception_variables(str(tmp_path / "missing.pth"))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  del state["Mixed_7c.branch_pool.bn.running_var"]
  state["fc.weight"] = np.zeros((1000, 2048), np.float32)  # torchvision's 1000 classes.
  np.savez(tmp_path / "bad.npz", **state)
  with pytest.raises(ValueError, match=r"Mixed_7c\.branch_pool\.bn\.running_var") as e:
    inception.load_inception_variables(str(tmp_path / "bad.npz"))
  assert "fc.weight: expected (1008, 2048), got (1000, 2048)" in str(e.value)


def test_bad_images(feature_fn):
  images = np.zeros((2, 32, 40, 3), np.float32)
  images[1, 3, 4, 0] = np.nan
  with pytest.raises(ValueError, match="1 of 2 images contain NaN"):
    feature_fn(images)
  with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
    feature_fn(np.full((2, 32, 40, 3), 255.0, np.float32))
  with pytest.raises(ValueError, match=r"\(N, H, W, 1 or 3\)"):
    feature_fn(np.zeros((2, 32, 40), np.float32))


def _png_folder(path, seed=2):
  from PIL import Image

  images = np.random.RandomState(seed).randint(0, 256, (3, 32, 40, 3), dtype=np.uint8)
  os.makedirs(path)
  for i, im in enumerate(images):
    Image.fromarray(im).save(path / f"{i:03d}.png")
  return images


def test_stats_of_an_image_folder(reference, feature_fn, tmp_path):
  """load_images -> features -> mu/sigma -> .npz, against the torch network's pool3."""
  from dit import fid_stats, metrics

  model, _ = reference
  images = _png_folder(tmp_path / "imgs")
  loaded = fid_stats.load_images(str(tmp_path / "imgs"))
  np.testing.assert_array_equal(loaded, images)
  feats = fid_stats.features_of_images(loaded, lambda x: feature_fn(x)["pool"], chunk=2)
  with pytest.warns(metrics.SingularCovarianceWarning):
    mu, sigma = metrics.feature_statistics(feats)
  fid_stats.save_stats(str(tmp_path / "stats.npz"), mu, sigma)
  mu, sigma = fid_stats.load_stats(str(tmp_path / "stats.npz"), dim=inception.FEATURE_DIM)
  pool = _torch_features(model, images.astype(np.float32) / 127.5 - 1.0)[0].astype(np.float64)
  np.testing.assert_allclose(mu, pool.mean(0), atol=1e-4)
  np.testing.assert_allclose(sigma, np.cov(pool, rowvar=False), atol=1e-4)


@pytest.mark.slow
def test_fid_stats_command(reference, tmp_path):
  """`python -m dit.fid_stats --images=DIR --inception=PTH --out=stats.npz` end to end."""
  model, pth = reference
  images = _png_folder(tmp_path / "imgs")
  out = tmp_path / "stats.npz"
  cmd = [sys.executable, "-m", "dit.fid_stats", f"--images={tmp_path / 'imgs'}"]
  cmd += [f"--inception={pth}", f"--out={out}", "--batch_size=2"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "singular" in res.stderr  # 3 samples of 2048-d features.
  pool = _torch_features(model, images.astype(np.float32) / 127.5 - 1.0)[0].astype(np.float64)
  with np.load(out) as f:
    assert sorted(f.files) == ["mu", "sigma"]
    np.testing.assert_allclose(f["mu"], pool.mean(0), atol=1e-4)
    np.testing.assert_allclose(f["sigma"], np.cov(pool, rowvar=False), atol=1e-4)
