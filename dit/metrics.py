"""Sample-quality metrics: Frechet distance (FID), Inception Score, precision/recall.

All statistics are NumPy float64. Features come from any feature function: the FID
InceptionV3 (`dit.models.inception`, 2048-d pool3) for ImageNet-style numbers, or the
small digits classifier here (`digits_feature_fn`) for the CPU demo, whose "digits FID"
runs in seconds but is only comparable with itself.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import numpy as np
import scipy.special


class SingularCovarianceWarning(UserWarning):
  """Fewer samples than feature dimensions: the covariance estimate is singular."""


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f"{name} must be (N, D), got shape {features.shape}")
  if len(features) < 2:
    raise ValueError(f"{name} needs at least 2 samples for a covariance, got {len(features)}")
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{name} contain NaN or inf values")
  return features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64.

  Same estimator as pytorch-fid and the ADM evaluation suite (np.cov, ddof=1). Warns
  when N <= D: the covariance is then singular and FID is biased and unstable.
  """
  features = _check_features(features, "features")
  n, d = features.shape
  if n <= d:
    warnings.warn(
      f"{n} samples for {d}-d features: the covariance is singular (need N > D; "
      f"FID is usually computed on 10k-50k samples)",
      SingularCovarianceWarning,
      stacklevel=2,
    )
  return features.mean(axis=0), np.cov(features, rowvar=False)


def check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Float64 (mu (D,), sigma (D, D)); a ValueError naming `name` for bad shapes or values."""
  mu = np.atleast_1d(np.asarray(mu, np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, np.float64))
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(
      f"{name}: mu must be (D,) and sigma (D, D); got mu {mu.shape}, sigma {sigma.shape}"
    )
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"{name}: mu/sigma contain NaN or inf values")
  return mu, sigma


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

  tr((S1 S2)^(1/2)) is computed as sum sqrt(eig(A S2 A)) with A = S1^(1/2): A S2 A is
  symmetric PSD and has the eigenvalues of S1 S2, so this is the trace scipy's sqrtm
  gives (pytorch-fid) without its complex round-off or the eps-offset retry.
  """
  mu1, sigma1 = check_stats(mu1, sigma1, "first statistics")
  mu2, sigma2 = check_stats(mu2, sigma2, "second statistics")
  if mu1.shape != mu2.shape:
    raise ValueError(
      f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} (reference statistics "
      "from a different network or layer?)"
    )
  a = _sqrt_psd(sigma1)
  m = a @ sigma2 @ a
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """Frechet distance between the Gaussians fitted to two (N, D) feature sets."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score exp(E_x KL(p(y|x) || p(y))): mean and std over `splits` splits.

  logits: (N, K), e.g. the FID Inception's 1008-way "logits_unbiased" (the original
  TF code's pool3 @ W). Split as the reference code: consecutive chunks.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or not np.all(np.isfinite(logits)):
    raise ValueError(f"logits must be a finite (N, K) array, got shape {logits.shape}")
  if not 1 <= splits <= len(logits):
    raise ValueError(f"splits must be in [1, N={len(logits)}], got {splits}")
  log_p = scipy.special.log_softmax(logits, axis=1)
  scores = []
  for part in np.array_split(log_p, splits):
    log_py = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_py), axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d, 0.0)


def _knn_radii(features: np.ndarray, k: int, chunk: int) -> np.ndarray:
  """Squared distance of each row to its k-th nearest other row."""
  radii = np.empty(len(features))
  for s in range(0, len(features), chunk):
    d = _pairwise_sq_dists(features[s : s + chunk], features)
    radii[s : s + chunk] = np.partition(d, k, axis=1)[:, k]  # Index 0 is the point itself.
  return radii


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, chunk: int):
  """Fraction of queries inside at least one ball (manifold_i, radius_i)."""
  inside = np.zeros(len(queries), bool)
  for s in range(0, len(queries), chunk):
    d = _pairwise_sq_dists(queries[s : s + chunk], manifold)
    inside[s : s + chunk] = np.any(d <= radii[None, :], axis=1)
  return float(inside.mean())


def precision_recall(
  real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, chunk: int = 256
) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019), k-NN manifolds.

  precision: fraction of fake samples inside the real manifold (union of balls around
  each real feature with radius its distance to the k-th nearest real neighbour);
  recall: fraction of real samples inside the fake manifold.
  """
  real = _check_features(real_features, "real_features")
  fake = _check_features(fake_features, "fake_features")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
  if not 1 <= k < min(len(real), len(fake)):
    raise ValueError(f"k must be in [1, min(N_real, N_fake) - 1], got {k}")
  precision = _coverage(real, _knn_radii(real, k, chunk), fake, chunk)
  recall = _coverage(fake, _knn_radii(fake, k, chunk), real, chunk)
  return precision, recall


# --- The digits demo's metric ------------------------------------------------------------

DIGITS_TRAIN_FRACTION = 0.8  # The rest of load_digits is held out to check the classifier.


@functools.lru_cache(maxsize=4)
def digits_classifier(hidden_size: int = 64, seed: int = 0):
  """A small MLP (one ReLU hidden layer) fitted on 80% of scikit-learn's digits.

  Deterministic (fixed split and random_state). Inputs: (N, 64) grey levels / 16.
  Returns the fitted sklearn MLPClassifier; `digits_held_out()` gives the other 20%.
  """
  from sklearn.neural_network import MLPClassifier
  from threadpoolctl import threadpool_limits

  x, y = _digits_split(seed)[:2]
  # L-BFGS: full-batch and deterministic; converges in ~50 iterations (about a second).
  clf = MLPClassifier(
    hidden_layer_sizes=(hidden_size,), solver="lbfgs", alpha=1e-3, max_iter=200, random_state=seed
  )
  # One BLAS thread: these matrices are tiny, and threads made the fit ~30x slower on a
  # busy 2-core machine (0.2 s vs 5 s CPU); it also keeps the fit bit-reproducible.
  with warnings.catch_warnings(), threadpool_limits(1):
    warnings.simplefilter("ignore")  # ConvergenceWarning: the accuracy is what is tested.
    clf.fit(x / 16.0, y)
  return clf


def _digits_split(seed: int):
  from sklearn.datasets import load_digits

  digits = load_digits()
  order = np.random.RandomState(seed).permutation(len(digits.target))
  n_train = int(DIGITS_TRAIN_FRACTION * len(order))
  tr, te = order[:n_train], order[n_train:]
  x = digits.data.astype(np.float64)
  return x[tr], digits.target[tr], x[te], digits.target[te]


def digits_held_out(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The held-out digits: images (N, 8, 8, 1) in [-1, 1] and labels (N,) int."""
  x, y = _digits_split(seed)[2:]
  return (x.reshape(-1, 8, 8, 1) / 8.0 - 1.0).astype(np.float32), y


def digits_to_grey_levels(images: np.ndarray) -> np.ndarray:
  """(N, H, W, 1) images in [-1, 1] at any resolution -> (N, 64) in load_digits' 0..16.

  Downsampled to 8x8 by area averaging (exact block means when H and W are multiples
  of 8), which inverts an upsampling of the 8x8 digits up to a blur.
  """
  images = np.asarray(images, np.float64)
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f"digits images must be (N, H, W, 1), got shape {images.shape}")
  n, h, w, _ = images.shape
  if h < 8 or w < 8:
    raise ValueError(f"digits images must be at least 8x8, got {h}x{w}")
  if not np.all(np.isfinite(images)):
    raise ValueError("digits images contain NaN or inf values")
  images = np.clip(images[..., 0], -1.0, 1.0)
  if h % 8 == 0 and w % 8 == 0:
    small = images.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
  else:
    import jax

    small = np.asarray(jax.image.resize(images, (n, 8, 8), method="linear", antialias=True))
  return ((small + 1.0) * 8.0).reshape(n, 64)


def digits_feature_fn(hidden_size: int = 64, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
  """Returns fn(images (N, H, W, 1) in [-1, 1]) -> (N, hidden_size) features.

  The features are the hidden ReLU activations of `digits_classifier`: a fast,
  FID-like metric for the digits demo (use with `fid_from_features`; needs N > D).
  """
  clf = digits_classifier(hidden_size, seed)
  w, b = clf.coefs_[0], clf.intercepts_[0]

  def feature_fn(images: np.ndarray) -> np.ndarray:
    return np.maximum(digits_to_grey_levels(images) / 16.0 @ w + b, 0.0)

  return feature_fn


def digits_classifier_accuracy(
  samples: np.ndarray, labels: np.ndarray, hidden_size: int = 64, seed: int = 0
) -> float:
  """Fraction of samples (N, H, W, 1) in [-1, 1] the classifier assigns to `labels` (N,)."""
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != len(samples):
    raise ValueError(f"{len(samples)} samples but {len(labels)} labels")
  clf = digits_classifier(hidden_size, seed)
  pred = clf.predict(digits_to_grey_levels(samples) / 16.0)
  return float(np.mean(pred == labels))
