"""Image decoding and ADM/DiT preprocessing: center crop + resize, flip, to [-1, 1]; and the
resize-to-cover + center crop of aspect-ratio buckets (dit/data/buckets.py).

All functions are pure NumPy/PIL and deterministic; randomness (the flip bit) is
passed in by the pipeline.
"""

import io
import os

import numpy as np
from PIL import Image

# Decoders raise these for corrupt or truncated files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_image(data: bytes | str | os.PathLike) -> Image.Image:
  """Opens and fully decodes an image from encoded bytes or a path.

  Raises:
    OSError / ValueError (from PIL) for corrupt or truncated files.
  """
  if isinstance(data, bytes | bytearray | memoryview):
    image = Image.open(io.BytesIO(data))
  else:
    image = Image.open(data)
  image.load()  # Decode now, so truncated files fail here and not later.
  return image


def to_mode(image: Image.Image, channels: int) -> Image.Image:
  """Converts any PIL mode to 8-bit "RGB" (channels=3) or "L" (channels=1).

  16-bit and 32-bit integer greyscale are rescaled (PIL's own convert clips them),
  transparent images are composited on white, palette/CMYK/LA go through RGB(A).
  """
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  if image.mode.startswith("I") or image.mode == "F":
    arr = np.asarray(image).astype(np.float64)
    if image.mode == "F":
      peak = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
    else:  # "I;16*" is 16-bit; "I" is 32-bit but PNG 16-bit data also lands there.
      peak = 255.0 if arr.max(initial=0) <= 255 else 65535.0
    image = Image.fromarray(np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8))
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  target = "RGB" if channels == 3 else "L"
  return image if image.mode == target else image.convert(target)


def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
  """ADM's center crop: box-halve while >= 2x, bicubic resize short side, crop.

  Returns:
    (resolution, resolution, C) uint8 (C from the image mode).
  """
  return cover_crop(image, resolution, resolution)


def cover_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
  """Resize to cover height x width, then center crop (PixArt's bucket transform); ADM's
  center crop when square: box-halve while both sides are >= 2x, then one bicubic resize.

  Returns:
    (height, width, C) uint8 (C from the image mode).
  """
  while image.size[0] >= 2 * width and image.size[1] >= 2 * height:
    image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
  scale = max(width / image.size[0], height / image.size[1])
  size = tuple(max(t, round(s * scale)) for s, t in zip(image.size, (width, height), strict=True))
  image = image.resize(size, resample=Image.BICUBIC)
  arr = np.asarray(image)
  top = (arr.shape[0] - height) // 2
  left = (arr.shape[1] - width) // 2
  arr = arr[top : top + height, left : left + width]
  return arr[..., None] if arr.ndim == 2 else arr


def to_float(image_u8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image_u8.astype(np.float32) / 127.5 - 1.0


def preprocess(
  image: Image.Image | np.ndarray,
  resolution: int | tuple[int, int],
  channels: int = 3,
  flip: bool = False,
) -> np.ndarray:
  """A decoded image (PIL or HW[C] uint8 array) -> (R, R, channels) float32 in [-1, 1]; with
  resolution (height, width): (height, width, channels), resized to cover and center-cropped
  (an aspect-ratio bucket)."""
  if isinstance(image, np.ndarray):
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    image = Image.fromarray(image)
  height, width = (resolution, resolution) if np.ndim(resolution) == 0 else resolution
  arr = cover_crop(to_mode(image, channels), int(height), int(width))
  if flip:
    arr = arr[:, ::-1]
  return to_float(arr)
