"""The embedded default data: scikit-learn's 8x8 handwritten digits, no download.

1797 images, 17 grey levels (0..16), 10 classes. Upsampled once to the requested
resolution with bilinear interpolation and mapped to [-1, 1].
"""

import functools

import numpy as np
from PIL import Image

NUM_CLASSES = 10
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption templates for text-to-image ({name}: "seven", {digit}: "7"). Several phrasings per
# digit, so that a text-conditioned model must read which digit is asked for.
CAPTION_TEMPLATES = (
  "a handwritten digit {name}",
  "the number {digit}",
  "a drawing of a {name}",
  "{name}",
  "digit {digit}",
  "a picture of the number {name}",
)
CAPTION_MODES = (False, True, "fixed", "templates")


@functools.lru_cache(maxsize=8)
def _load(resolution: int) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # Lazy: only the digits source needs sklearn.

  if resolution < 1:
    raise ValueError(f"digits resolution must be >= 1, got {resolution}")
  digits = load_digits()
  images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1].
  if resolution != 8:
    # PIL "F" mode resizes float images without quantising to 8 bits.
    images = np.stack(
      [
        np.asarray(Image.fromarray(im, mode="F").resize((resolution, resolution), Image.BILINEAR))
        for im in images
      ]
    )
  images = np.clip(images * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)[..., None]
  images.setflags(write=False)
  labels = digits.target.astype(np.int32)
  labels.setflags(write=False)
  return images, labels


def load_digits_arrays(resolution: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """All digits as arrays.

  Returns:
    images: (1797, resolution, resolution, 1) float32 in [-1, 1] (read-only).
    labels: (1797,) int32 in [0, 10).
  """
  return _load(int(resolution))


def digit_caption(label: int, template: int = 0) -> str:
  """A caption for text-to-image on digits, e.g. 7 -> "a handwritten digit seven".

  `template` indexes CAPTION_TEMPLATES (7, 1 -> "the number 7").
  """
  label = int(label)
  return CAPTION_TEMPLATES[int(template)].format(name=DIGIT_NAMES[label], digit=label)


def all_digit_captions(templates: bool = True) -> list[str]:
  """Every caption the digits source can produce: 10 x len(CAPTION_TEMPLATES), or 10."""
  num = len(CAPTION_TEMPLATES) if templates else 1
  return [digit_caption(y, k) for k in range(num) for y in range(NUM_CLASSES)]


class DigitsSource:
  """Random-access source of digits records (Grain `RandomAccessDataSource` protocol).

  Records: {"image": (R, R, 1) float32 in [-1, 1], "label": () int32} and, with
  `captions`, "caption": str. captions=True or "fixed": "a handwritten digit seven" for
  every image; "templates": each image gets one of CAPTION_TEMPLATES, drawn once per image
  from a fixed seed (the dataset is ordered 0, 1, ..., 9, 0, ...; a random draw keeps the
  template independent of the digit).
  """

  def __init__(self, resolution: int = 16, captions: bool | str = False):
    if captions not in CAPTION_MODES:
      raise ValueError(f"digits captions must be one of {CAPTION_MODES}, got {captions!r}")
    self.images, self.labels = load_digits_arrays(resolution)
    self.captions = captions
    self.templates = np.zeros(len(self.labels), np.int32)
    if captions == "templates":
      rng = np.random.default_rng(0)
      self.templates = rng.integers(0, len(CAPTION_TEMPLATES), len(self.labels)).astype(np.int32)

  def all_captions(self) -> list[str]:
    """The distinct captions of this source (to embed them once, up front)."""
    return all_digit_captions(self.captions == "templates") if self.captions else []

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    record = {"image": self.images[index], "label": self.labels[index]}
    if self.captions:
      record["caption"] = digit_caption(self.labels[index], self.templates[index])
    return record

  def read_batch(self, indices: np.ndarray, flips: np.ndarray) -> dict:
    """Vectorised read of records `indices` (B,), rows mirrored where `flips` (B,) bool.

    Returns {"image": (B, R, R, 1), "label": (B,)[, "caption": (B,) str]}.
    """
    images = self.images[indices]
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    batch = {"image": images, "label": self.labels[indices]}
    if self.captions:
      captions = [
        digit_caption(y, k) for y, k in zip(batch["label"], self.templates[indices], strict=True)
      ]
      batch["caption"] = np.array(captions, dtype=str)
    return batch

  def __repr__(self) -> str:
    return f"DigitsSource(n={len(self)}, shape={self.images.shape[1:]}, captions={self.captions})"
