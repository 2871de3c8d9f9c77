"""Frechet distance, Inception Score, precision/recall, stats files, the digits metric."""

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from dit import fid_stats, metrics


def _random_stats(rng, d, n):
  x = rng.randn(n, d) @ rng.randn(d, d) * 0.3 + rng.randn(d)
  return x.mean(0), np.cov(x, rowvar=False)


def _pytorch_fid_formula(mu1, s1, mu2, s2):
  """Independent reference: pytorch-fid's calculate_frechet_distance (scipy sqrtm)."""
  covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * 1e-6
    covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
  covmean = covmean.real
  diff = mu1 - mu2
  return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("d", [8, 64, 128])
def test_frechet_distance_matches_scipy_sqrtm(d):
  rng = np.random.RandomState(d)
  a, b = _random_stats(rng, d, 4 * d), _random_stats(rng, d, 4 * d)
  got = metrics.frechet_distance(*a, *b)
  np.testing.assert_allclose(got, _pytorch_fid_formula(*a, *b), rtol=1e-6)
  np.testing.assert_allclose(metrics.frechet_distance(*b, *a), got, rtol=1e-6)  # Symmetric.


def test_frechet_distance_closed_form_for_commuting_covariances():
  # Diagonal covariances: FD = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, also rank-deficient.
  a, b = np.array([1.0, 4.0, 0.0, 2.0]), np.array([9.0, 1.0, 3.0, 0.0])
  mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
  want = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(
    metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want, rtol=1e-12
  )


def test_feature_statistics_and_singular_warning():
  x = np.random.RandomState(0).randn(50, 5)
  mu, sigma = metrics.feature_statistics(x)
  np.testing.assert_allclose(mu, x.mean(0))
  np.testing.assert_allclose(sigma, np.cov(x.T, ddof=1))
  with pytest.warns(metrics.SingularCovarianceWarning, match="10 samples for 16-d"):
    metrics.feature_statistics(np.random.RandomState(0).randn(10, 16))
  with pytest.raises(ValueError, match="NaN"):
    metrics.feature_statistics(np.full((4, 2), np.nan))
  with pytest.raises(ValueError, match="at least 2 samples"):
    metrics.feature_statistics(np.zeros((1, 2)))


def test_frechet_distance_bad_stats():
  mu, sigma = np.zeros(4), np.eye(4)
  with pytest.raises(ValueError, match="feature dimensions differ: 4 vs 3"):
    metrics.frechet_distance(mu, sigma, np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match=r"sigma \(D, D\)"):
    metrics.frechet_distance(mu, np.eye(3), mu, sigma)
  with pytest.raises(ValueError, match="NaN"):
    metrics.frechet_distance(mu, sigma, mu * np.nan, sigma)


def test_inception_score_closed_forms():
  # Uniform predictions: p(y|x) = p(y) -> IS = 1. Confident and balanced over K -> IS = K.
  np.testing.assert_allclose(metrics.inception_score(np.zeros((20, 7)), splits=2), (1.0, 0.0))
  logits = np.tile(np.eye(5) * 100.0, (4, 1))
  mean, std = metrics.inception_score(logits, splits=1)
  np.testing.assert_allclose(mean, 5.0, rtol=1e-6)
  with pytest.raises(ValueError, match="splits"):
    metrics.inception_score(logits, splits=21)


def _brute_force_pr(real, fake, k):
  def radius(x, i):
    return np.sort(np.linalg.norm(x - x[i], axis=1))[k]

  def covered(manifold, queries):
    r = np.array([radius(manifold, i) for i in range(len(manifold))])
    return np.mean([np.any(np.linalg.norm(manifold - q, axis=1) <= r) for q in queries])

  return covered(real, fake), covered(fake, real)


def test_precision_recall():
  real = np.array([[0.0], [1.0], [2.0], [3.0]])
  fake = np.array([[0.5], [3.9], [10.0]])
  # k=1 radii: real all 1 -> 0.5 and 3.9 covered, 10 not; fake radii 3.4, 3.4, 6.1 cover all.
  np.testing.assert_allclose(metrics.precision_recall(real, fake, k=1), (2 / 3, 1.0))
  rng = np.random.RandomState(0)
  real, fake = rng.randn(60, 5), rng.randn(50, 5) * 1.5 + 0.5
  got = metrics.precision_recall(real, fake, k=3, chunk=16)
  np.testing.assert_allclose(got, _brute_force_pr(real, fake, 3))
  assert metrics.precision_recall(real, real) == (1.0, 1.0)
  assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
  with pytest.raises(ValueError, match="feature dimensions differ"):
    metrics.precision_recall(real, fake[:, :3])


def test_precision_recall_balls_are_closed():
  """A sample exactly at distance radius from a manifold point is inside its ball
  (Kynkaanniemi et al.: ||x - m|| <= NND_k(m)); a hair further out it is not."""
  real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: all 1.
  on = np.array([[4.0], [-1.0]])  # Distance 1 from 3 and from 0.
  assert metrics.precision_recall(real, on, k=1)[0] == 1.0
  off = on + np.array([[1e-6], [-1e-6]])
  assert metrics.precision_recall(real, off, k=1)[0] == 0.0
  # k on its bounds: 1 and min(N_real, N_fake) - 1 are allowed, 0 and min(N) are not.
  assert metrics.precision_recall(real, on, k=1) == _brute_force_pr(real, on, 1)
  assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)
  for k in (0, 2):
    with pytest.raises(ValueError, match="k must be in"):
      metrics.precision_recall(real, on, k=k)


def test_stats_files(tmp_path):
  rng = np.random.RandomState(0)
  mu, sigma = _random_stats(rng, 6, 30)
  path = str(tmp_path / "ref.npz")
  fid_stats.save_stats(path, mu, sigma)
  got = fid_stats.load_stats(path, dim=6)
  np.testing.assert_array_equal(got[0], mu)
  np.testing.assert_array_equal(got[1], sigma)
  with pytest.raises(ValueError, match="holds 6-d statistics, expected 2048-d"):
    fid_stats.load_stats(path, dim=2048)
  with pytest.raises(FileNotFoundError):
    fid_stats.load_stats(str(tmp_path / "nope.npz"))
  # An ADM-style reference batch: arr_0 uint8 images plus mu/sigma (and spatial stats).
  images = rng.randint(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  adm = str(tmp_path / "adm.npz")
  np.savez(adm, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
  np.testing.assert_array_equal(fid_stats.load_reference_stats(adm)[1], sigma)
  np.testing.assert_array_equal(fid_stats.load_images(adm, max_images=5), images[:5])
  # Images only: statistics are computed with the given feature function.
  only = str(tmp_path / "images.npz")
  np.savez(only, arr_0=images)
  with pytest.raises(ValueError, match="arr_0"):
    fid_stats.load_stats(only)
  feature_fn = lambda x: x.reshape(len(x), -1)[:, :4]
  want = metrics.feature_statistics(images.reshape(12, -1)[:, :4] / 127.5 - 1.0)
  got = fid_stats.load_reference_stats(only, feature_fn)
  np.testing.assert_allclose(got[0], want[0], atol=1e-7)  # float32 images.
  np.testing.assert_allclose(got[1], want[1], atol=1e-7)
  np.savez(only, arr_0=images.astype(np.float32))
  with pytest.raises(ValueError, match="must be uint8"):
    fid_stats.load_images(only)


def test_load_images_folder_errors(tmp_path):
  with pytest.raises(ValueError, match="No image files"):
    fid_stats.load_images(str(tmp_path))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
  Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "b.png")  # Grey -> RGB.
  with pytest.raises(ValueError, match="same size"):
    fid_stats.load_images(str(tmp_path))


# --- The digits demo's metric ------------------------------------------------------------


def _upsample(images, r):
  """(N, 8, 8, 1) in [-1, 1] -> (N, r, r, 1), bilinear as the digits input pipeline."""
  x = (images[..., 0] + 1.0) / 2.0
  up = [np.asarray(Image.fromarray(im, mode="F").resize((r, r), Image.BILINEAR)) for im in x]
  return (np.stack(up) * 2.0 - 1.0)[..., None]


def test_digits_classifier_is_accurate_on_held_out_digits():
  images, labels = metrics.digits_held_out()
  assert len(labels) == 360 and images.shape[1:] == (8, 8, 1)
  # The grey levels round-trip exactly at 8x8 and through block means at 2x, 4x nearest.
  assert np.array_equal(
    np.round(metrics.digits_to_grey_levels(images)), metrics.digits_to_grey_levels(images)
  )
  big = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)
  np.testing.assert_allclose(
    metrics.digits_to_grey_levels(big), metrics.digits_to_grey_levels(images), atol=1e-12
  )
  assert metrics.digits_classifier_accuracy(images, labels) >= 0.95
  for r in (16, 12):  # Bilinear upsampling as the data pipeline does, at r = 16 and not 8k.
    assert metrics.digits_classifier_accuracy(_upsample(images, r), labels) >= 0.93
  assert metrics.digits_classifier_accuracy(images, (labels + 1) % 10) < 0.1


def test_digits_fid_is_zero_on_itself_and_grows_with_noise():
  images = _upsample(metrics.digits_held_out()[0], 16)
  feature_fn = metrics.digits_feature_fn()
  feats = feature_fn(images)
  assert feats.shape == (360, 64)
  scale = np.trace(np.cov(feats, rowvar=False))  # ~300: FID is ~0 relative to this.
  assert abs(metrics.fid_from_features(feats, feats)) < 1e-7 * scale
  rng = np.random.RandomState(0)
  noise = rng.randn(*images.shape)
  fids = [
    metrics.fid_from_features(feats, feature_fn(np.clip(images + s * noise, -1, 1)))
    for s in (0.05, 0.1, 0.2, 0.4, 0.8)
  ]
  assert fids[0] > 0 and all(np.diff(fids) > 0), fids


def test_digits_bad_input():
  images, labels = metrics.digits_held_out()
  with pytest.raises(ValueError, match="360 samples but 10 labels"):
    metrics.digits_classifier_accuracy(images, labels[:10])
  bad = images.copy()
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    metrics.digits_feature_fn()(bad)
  with pytest.raises(ValueError, match=r"\(N, H, W, 1\)"):
    metrics.digits_classifier_accuracy(np.repeat(images, 3, axis=-1), labels)


# --- FD-DINOv2 (EDM2's protocol) --------------------------------------------------------


def _tiny_dinov2(path, registers=False):
  """A tiny random DINOv2 at patch 14 saved with save_pretrained: 518 -> 28 px, a 2 x 2
  position grid, so EDM2's 224 px input interpolates it to 16 x 16."""
  import torch
  import transformers

  config_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
  model_cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
  config = config_cls(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
  )
  torch.manual_seed(0)
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      big = "position_embeddings" in name or "register_tokens" in name
      p.copy_(torch.randn_like(p) * (1.0 if big else 0.3) + (1.0 if "lambda1" in name else 0.0))
  model.save_pretrained(path)
  return model


def _edm2_dinov2_features(model, uint8_nhwc):
  """EDM2's DINOv2Detector ('torch' resize mode) around a transformers model whose position
  interpolation is swapped for the original DINOv2's (scale_factor with the +0.1 offset)."""
  import torch

  emb = model.embeddings

  def original_interpolation(embeddings, height, width):
    pos = emb.position_embeddings
    m = int((pos.shape[1] - 1) ** 0.5)
    h0, w0 = height // 14, width // 14
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(
      patch, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False
    )
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)

  emb.interpolate_pos_encoding = original_interpolation
  x = torch.from_numpy(uint8_nhwc).permute(0, 3, 1, 2)
  x = torch.nn.functional.interpolate(x.float(), size=(224, 224), mode="bicubic", antialias=True)
  x = x / 255
  x = (x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, -1, 1, 1)) / torch.tensor(
    [0.229, 0.224, 0.225]
  ).reshape(1, -1, 1, 1)
  with torch.no_grad():
    return model(x).pooler_output.numpy()


def test_dinov2_cls_features_follow_edm2(tmp_path):
  model = _tiny_dinov2(tmp_path)
  images = np.random.RandomState(0).randint(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  fn = fid_stats.dinov2_cls_fn(str(tmp_path), batch_size=4)  # 5 = one full + one padded batch.
  got = fid_stats.features_of_images(images, fn)
  want = _edm2_dinov2_features(model, images)
  assert got.shape == (5, 16)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_fd_dinov2_is_zero_on_itself_and_grows_with_a_shift(tmp_path):
  _tiny_dinov2(tmp_path, registers=True)
  real = _upsample(metrics.digits_held_out()[0][:120], 16)
  uint8 = np.clip(np.round((np.repeat(real, 3, -1) + 1) * 127.5), 0, 255).astype(np.uint8)
  fn = fid_stats.dinov2_cls_fn(str(tmp_path))
  feats = fid_stats.features_of_images(uint8, fn)
  assert feats.shape == (120, 16)
  # Reference statistics as `python -m dit.fid_stats --feature=dinov2` writes them.
  path = str(tmp_path / "ref.npz")
  fid_stats.save_stats(path, *metrics.feature_statistics(feats))
  ref = fid_stats.load_reference_stats(path, dim=16)
  scale = np.trace(ref[1])
  assert abs(metrics.frechet_distance(*metrics.feature_statistics(feats), *ref)) < 1e-9 * scale
  fds = []
  for shift in (20, 60):
    shifted = np.clip(uint8.astype(np.int64) + shift, 0, 255).astype(np.uint8)
    fake = metrics.feature_statistics(fid_stats.features_of_images(shifted, fn))
    fds.append(metrics.frechet_distance(*fake, *ref))
  assert 1e-3 * scale < fds[0] < fds[1], (fds, scale)


@pytest.mark.slow
def test_fid_stats_command_writes_dinov2_stats(tmp_path):
  """`python -m dit.fid_stats --images=NPZ --feature=dinov2 --dinov2=DIR --out=...`."""
  import json
  import os
  import subprocess
  import sys

  _tiny_dinov2(tmp_path / "dino")
  images = np.random.RandomState(1).randint(0, 256, (40, 24, 24, 3), dtype=np.uint8)
  np.savez(tmp_path / "images.npz", arr_0=images)
  out = tmp_path / "stats.npz"
  cmd = [sys.executable, "-m", "dit.fid_stats", f"--images={tmp_path / 'images.npz'}"]
  cmd += ["--feature=dinov2", f"--dinov2={tmp_path / 'dino'}", f"--out={out}", "--noprogress"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert res.returncode == 0, res.stderr[-3000:]
  assert json.loads(res.stdout.strip().splitlines()[-1])["dim"] == 16
  want = metrics.feature_statistics(
    fid_stats.features_of_images(images, fid_stats.dinov2_cls_fn(str(tmp_path / "dino")))
  )
  mu, sigma = fid_stats.load_stats(str(out), dim=16)
  np.testing.assert_allclose(mu, want[0], atol=1e-6)
  np.testing.assert_allclose(sigma, want[1], atol=1e-6)
  missing = subprocess.run(cmd[:5] + [f"--out={out}"], capture_output=True, text=True, env=env)
  assert missing.returncode != 0 and "--feature=dinov2 needs --dinov2=PATH" in missing.stderr
