"""FID reference statistics: read, write and compute `.npz` files of `mu` and `sigma`.

File layout (pytorch-fid and the ADM evaluation suite): an `.npz` with `mu` (D,) and
`sigma` (D, D), D = 2048 for Inception pool3. ADM's reference batches (e.g.
`VIRTUAL_imagenet256_labeled.npz`) also hold the images as `arr_0` (N, H, W, 3) uint8
(and spatial `mu_s`/`sigma_s`, unused here); a file with only `arr_0` is an image batch
whose statistics `load_reference_stats` computes.

Published statistics were made with TF's Inception graph; the pytorch-fid network used
here reproduces it up to resize details, so FIDs agree to within small differences.

  python -m dit.fid_stats --images=DIR_or_NPZ --inception=WEIGHTS --out=stats.npz
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from dit import metrics

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes `mu` (D,) and `sigma` (D, D) as float64 to an `.npz`."""
  mu, sigma = metrics.check_stats(mu, sigma, path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, mu=mu, sigma=sigma)


def _open_npz(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Statistics/images file {path!r} does not exist")
  try:
    return np.load(path)
  except Exception as e:
    raise ValueError(f"Could not read {path!r} as .npz: {e}") from e


def load_stats(path: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads `mu` (D,) and `sigma` (D, D) (float64) from a pytorch-fid/ADM `.npz`.

  dim: the expected feature dimension (2048 for Inception pool3); a mismatch is an error.
  """
  with _open_npz(path) as f:
    if "mu" not in f.files or "sigma" not in f.files:
      hint = (
        " It holds images (arr_0): use load_reference_stats or `python -m dit.fid_stats`."
        if "arr_0" in f.files
        else ""
      )
      raise ValueError(f"{path!r} has no 'mu'/'sigma' arrays (keys: {f.files}).{hint}")
    mu, sigma = metrics.check_stats(f["mu"], f["sigma"], path)
  if dim is not None and mu.shape[0] != dim:
    raise ValueError(
      f"{path!r} holds {mu.shape[0]}-d statistics, expected {dim}-d (features of a "
      "different network or layer?)"
    )
  return mu, sigma


def _as_uint8_nhwc(images: np.ndarray, source: str) -> np.ndarray:
  if images.dtype != np.uint8:
    raise ValueError(f"{source}: images must be uint8 (0..255), got {images.dtype}")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{source}: images must be (N, H, W, 3) or (N, H, W), got {images.shape}")
  return images


def load_images(path: str, max_images: int = 0, progress: bool = False) -> np.ndarray:
  """Images (N, H, W, C) uint8 from a directory of image files or an `.npz` (`arr_0`).

  Directory files are read in sorted order and converted to RGB; all must have one size.
  max_images > 0 keeps the first max_images. progress: a tqdm bar over a directory's files.
  """
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
      raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in directory {path!r}")
    if max_images > 0:
      names = names[:max_images]
    from PIL import Image

    images = []
    for name in tqdm(names, "read images", unit="img", disable=not progress):
      with Image.open(os.path.join(path, name)) as im:
        images.append(np.asarray(im.convert("RGB")))
      if images[-1].shape != images[0].shape:
        raise ValueError(
          f"{os.path.join(path, name)!r} is {images[-1].shape[:2]}, but {names[0]!r} is "
          f"{images[0].shape[:2]}: all images must have the same size"
        )
    return np.stack(images)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Images {path!r}: no such directory or .npz file")
  with _open_npz(path) as f:
    if "arr_0" not in f.files:
      raise ValueError(f"{path!r} has no images 'arr_0' (keys: {f.files})")
    images = _as_uint8_nhwc(f["arr_0"], path)
  return images[:max_images] if max_images > 0 else images


def features_of_images(
  images: np.ndarray,
  feature_fn: Callable[[np.ndarray], np.ndarray],
  chunk: int = 500,
  progress: bool = False,
) -> np.ndarray:
  """Applies feature_fn to uint8 images (N, H, W, C), chunk by chunk, as [-1, 1] floats.

  feature_fn: float images in [-1, 1] -> (n, D) features. progress: a tqdm bar (images,
  rate, ETA).
  """
  images = _as_uint8_nhwc(np.asarray(images), "features_of_images")
  feats = []
  with tqdm(total=len(images), desc="features", unit="img", disable=not progress) as bar:
    for s in range(0, len(images), chunk):
      feats.append(np.asarray(feature_fn(images[s : s + chunk].astype(np.float32) / 127.5 - 1.0)))
      bar.update(len(feats[-1]))
  return np.concatenate(feats)


def inception_pool_fn(weights: str, batch_size: int = 50) -> Callable[[np.ndarray], np.ndarray]:
  """images in [-1, 1] -> (N, 2048) pool3 features of the FID Inception at `weights`."""
  from dit.models import inception

  fn = inception.make_feature_fn(inception.load_inception_variables(weights), batch_size)
  return lambda images: fn(images)["pool"]


def load_reference_stats(
  path: str, feature_fn: Callable[[np.ndarray], np.ndarray] | None = None, dim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """`mu`, `sigma` of a stats `.npz`, or computed from its `arr_0` images with feature_fn."""
  with _open_npz(path) as f:
    has_stats = "mu" in f.files and "sigma" in f.files
  if has_stats:
    return load_stats(path, dim)
  if feature_fn is None:
    raise ValueError(f"{path!r} has no 'mu'/'sigma'; pass a feature_fn to compute them")
  mu, sigma = metrics.feature_statistics(features_of_images(load_images(path), feature_fn))
  if dim is not None and mu.shape[0] != dim:
    raise ValueError(f"feature_fn gives {mu.shape[0]}-d features, expected {dim}-d")
  return mu, sigma


def main(argv) -> None:
  del argv
  from absl import flags

  f = flags.FLAGS
  images = load_images(f.images, f.max_images, progress=f.progress)
  feature_fn = inception_pool_fn(f.inception, f.batch_size)
  features = features_of_images(images, feature_fn, progress=f.progress)
  mu, sigma = metrics.feature_statistics(features)
  save_stats(f.out, mu, sigma)
  print(json.dumps({"out": f.out, "num_images": len(images), "dim": int(mu.shape[0])}))


def cli() -> None:
  from absl import app, flags

  flags.DEFINE_string("images", None, "Directory of images or .npz with arr_0 (N,H,W,3) uint8.")
  flags.DEFINE_string("inception", None, "pytorch-fid pt_inception-2015-12-05-6726825d.pth.")
  flags.DEFINE_string("out", None, "Output .npz with mu and sigma.")
  flags.DEFINE_integer("batch_size", 50, "Inception batch size.")
  flags.DEFINE_integer("max_images", 0, "Use only the first N images (0: all).")
  flags.DEFINE_bool("progress", True, "tqdm bars with ETA (--progress=false for logs).")
  flags.mark_flags_as_required(["images", "inception", "out"])
  app.run(main)


if __name__ == "__main__":
  cli()
