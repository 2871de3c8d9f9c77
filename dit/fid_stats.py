"""FID / FD-DINOv2 reference statistics: read, write and compute `.npz` files of `mu`, `sigma`.

File layout (pytorch-fid and the ADM evaluation suite): an `.npz` with `mu` (D,) and
`sigma` (D, D), D = 2048 for Inception pool3, D = 1024 for DINOv2 ViT-L/14's CLS token (the
dimension tells the two apart, and loading checks it). ADM's reference batches (e.g.
`VIRTUAL_imagenet256_labeled.npz`) also hold the images as `arr_0` (N, H, W, 3) uint8
(and spatial `mu_s`/`sigma_s`, unused here); a file with only `arr_0` is an image batch
whose statistics `load_reference_stats` computes.

Published statistics were made with TF's Inception graph; the pytorch-fid network used
here reproduces it up to resize details, so FIDs agree to within small differences.

  python -m dit.fid_stats --images=DIR_or_NPZ --inception=WEIGHTS --out=stats.npz
  python -m dit.fid_stats --images=DIR_or_NPZ --feature=dinov2 --dinov2=DINOV2_DIR --out=dino.npz
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
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


# FD-DINOv2 as EDM2 computes it (NVlabs/edm2 calculate_metrics.py, DINOv2Detector, after
# layer6ai-labs/dgm-eval): uint8 RGB images -> F.interpolate(size=224, mode="bicubic",
# antialias=True) -> / 255 -> ImageNet mean/std -> torch.hub `dinov2_vitl14` -> its normalised
# CLS token (1024-d), statistics in float64, the Frechet distance as for FID. The Hugging Face
# checkpoint facebook/dinov2-large holds the same weights; torch.hub's model interpolates the
# 37 x 37 position grid with the +0.1 offset, which `dinov2_cls_fn` reproduces.
DINOV2_RESOLUTION = 224
DINOV2_BATCH = 64


@functools.lru_cache(maxsize=2)
def _dinov2_cls_apply(model_dir: str, stamp: tuple, resolution: int):
  del stamp  # Part of the cache key only: a rewritten checkpoint is read again.
  from dit.models import dinov2

  config, params = dinov2.load_dinov2(model_dir)
  # torch.hub's models: offset 0.1 without registers; the register models use size= (0.0)
  # with antialiasing, as transformers.
  offset = 0.0 if config.num_register_tokens else 0.1
  config = dataclasses.replace(config, interpolate_offset=offset)
  features = dinov2.make_features(config, resolution=resolution, antialias=True)
  apply = jax.jit(lambda p, x: features(p, x)["cls"])
  return apply, jax.device_put(params)


def dinov2_cls_fn(
  model_dir: str, batch_size: int = DINOV2_BATCH, resolution: int = DINOV2_RESOLUTION
) -> Callable[[np.ndarray], np.ndarray]:
  """images (N, H, W, 3 or 1) in [-1, 1] -> (N, D) float32 CLS features, EDM2's FD-DINOv2.

  model_dir: a Hugging Face DINOv2 directory (facebook/dinov2-large for EDM2's numbers).
  Runs in batches of batch_size (the last one padded: one compilation), matmuls in full
  float32 on every backend. Feed 8-bit-quantised images for numbers comparable with EDM2.
  """
  weights = [os.path.join(model_dir, n) for n in ("config.json", "model.safetensors")]
  stamp = tuple(os.path.getmtime(p) if os.path.exists(p) else 0.0 for p in weights)
  apply, params = _dinov2_cls_apply(os.path.abspath(model_dir), stamp, resolution)

  def feature_fn(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be (N, H, W, 1 or 3), got shape {images.shape}")
    if not np.all(np.isfinite(images)):
      raise ValueError("images contain NaN or inf values")
    outs = []
    for start in range(0, len(images), batch_size):
      batch = images[start : start + batch_size]
      n = len(batch)
      if n < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
      with jax.default_matmul_precision("highest"):  # No TF32 / bf16 passes on GPU and TPU.
        outs.append(np.asarray(apply(params, batch))[:n])
    if not outs:
      raise ValueError("no images given")
    return np.concatenate(outs)

  return feature_fn


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
  from absl import app, flags

  f = flags.FLAGS
  need = {"inception": f.inception, "dinov2": f.dinov2}[f.feature]
  if not need:
    raise app.UsageError(f"--feature={f.feature} needs --{f.feature}=PATH.")
  images = load_images(f.images, f.max_images, progress=f.progress)
  if f.feature == "inception":
    feature_fn = inception_pool_fn(f.inception, f.batch_size or 50)
  else:
    feature_fn = dinov2_cls_fn(f.dinov2, f.batch_size or DINOV2_BATCH)
  features = features_of_images(images, feature_fn, progress=f.progress)
  mu, sigma = metrics.feature_statistics(features)
  save_stats(f.out, mu, sigma)
  print(
    json.dumps(
      {"out": f.out, "feature": f.feature, "num_images": len(images), "dim": int(mu.shape[0])}
    )
  )


def define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("images", None, "Directory of images or .npz with arr_0 (N,H,W,3) uint8.")
  flags.DEFINE_enum(
    "feature", "inception", ["inception", "dinov2"],
    "inception: FID's pool3 (2048-d); dinov2: FD-DINOv2's CLS token (EDM2's protocol).",
  )  # fmt: skip
  flags.DEFINE_string("inception", None, "pytorch-fid pt_inception-2015-12-05-6726825d.pth.")
  flags.DEFINE_string("dinov2", None, "Hugging Face DINOv2 directory (facebook/dinov2-large).")
  flags.DEFINE_string("out", None, "Output .npz with mu and sigma.")
  flags.DEFINE_integer("batch_size", 0, "Batch size (0: 50 for Inception, 64 for DINOv2).")
  flags.DEFINE_integer("max_images", 0, "Use only the first N images (0: all).")
  flags.DEFINE_bool("progress", True, "tqdm bars with ETA (--progress=false for logs).")
  flags.mark_flags_as_required(["images", "out"])


def cli() -> None:
  from absl import app

  define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
