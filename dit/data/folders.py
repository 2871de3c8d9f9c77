"""Image folders: `root/class_name/*.jpg` (class-conditional) and image + caption pairs.

Sources are random access (`len`, `[i]`) and return undecoded records
{"image": path, "label": int32[, "caption": str]}; the pipeline decodes and
preprocesses them (so bad files are handled in one place). `image_sizes()` gives every
image's (height, width) for aspect-ratio buckets, from the files' headers (or a manifest's
"height" / "width").
"""

import concurrent.futures
import json
import logging
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
MANIFEST_NAME = "metadata.jsonl"  # The Hugging Face `imagefolder` convention.


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk_images(root: str) -> list[str]:
  """All image files under `root`, sorted, as paths."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    out.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
  return sorted(out)


def read_image_sizes(paths, num_threads: int = 8, known=None) -> np.ndarray:
  """(N, 2) int64 (height, width) in pixels of image files, from their headers (no decode).

  known: optional (N,) of (height, width) or None per path; given sizes are not read. A file
  whose header cannot be read gets (0, 0) (logged once with a count): the pipeline's bad-image
  handling deals with it when it is loaded.
  """

  def size(i):
    if known is not None and known[i] is not None:
      return known[i]
    try:
      with Image.open(paths[i]) as image:
        return image.size[1], image.size[0]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
      return 0, 0

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    sizes = np.asarray(list(pool.map(size, range(len(paths)))), np.int64).reshape(-1, 2)
  bad = np.flatnonzero(sizes.min(axis=1) <= 0)
  if bad.size:
    logging.warning(
      "%d images have unreadable headers (size unknown), e.g. %s", bad.size, paths[bad[0]]
    )
  return sizes


def _check_dir(root: str) -> None:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")


class ImageFolderSource:
  """ImageNet-style `root/<class_name>/**/*.{jpg,png,...}`; labels = sorted class index."""

  def __init__(self, root: str):
    _check_dir(root)
    self.root = root
    self.classes = sorted(
      e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
    )
    if not self.classes:
      raise ValueError(
        f"image folder {root!r} has no class subfolders; expected root/<class_name>/<image>"
      )
    paths, labels = [], []
    for label, name in enumerate(self.classes):
      files = _walk_images(os.path.join(root, name))
      if not files:
        logging.warning("class folder %r has no images", os.path.join(root, name))
      paths.extend(files)
      labels.extend([label] * len(files))
    if not paths:
      raise ValueError(
        f"image folder {root!r} has {len(self.classes)} class folders but no images "
        f"with extensions {IMAGE_EXTENSIONS}"
      )
    self.paths = paths
    self.labels = np.asarray(labels, np.int32)

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    return len(self.paths)

  def image_sizes(self, num_threads: int = 8) -> np.ndarray:
    """(N, 2) (height, width) of every image, from the file headers; (0, 0) if unreadable."""
    return read_image_sizes(self.paths, num_threads)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.paths[index], "label": self.labels[index]}

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.root!r}, n={len(self)}, classes={self.num_classes})"


class CaptionFolderSource:
  """Image + caption pairs for text-to-image.

  Captions come from a JSONL manifest (`path` is a .jsonl file, or `path/metadata.jsonl`
  exists; one {"file_name" | "image": relative path, "text" | "caption": str[, "label"]
  [, "height", "width"]} per line; the sizes spare reading headers for aspect-ratio buckets)
  or else from `<stem>.txt` beside each image.

  Args:
    path: folder or manifest file.
    missing_caption: "raise" (default), "skip" the image, or use an "empty" caption.
  """

  def __init__(self, path: str, missing_caption: str = "raise"):
    if missing_caption not in ("raise", "skip", "empty"):
      raise ValueError(
        f"missing_caption must be 'raise', 'skip' or 'empty', got {missing_caption!r}"
      )
    self.missing_caption = missing_caption
    manifest = path if path.endswith(".jsonl") else os.path.join(path, MANIFEST_NAME)
    if path.endswith(".jsonl") and not os.path.isfile(path):
      raise FileNotFoundError(f"caption manifest {path!r} does not exist")
    self._sizes = None  # Per image (height, width) or None, from the manifest.
    if os.path.isfile(manifest):
      self.root = os.path.dirname(manifest)
      self.paths, self._captions, labels = self._read_manifest(manifest)
      self._caption_files = False
    else:
      _check_dir(path)
      self.root = path
      self.paths, self._captions, labels = self._scan_txt(path)
      self._caption_files = True
    if not self.paths:
      raise ValueError(f"caption dataset {path!r} has no images with captions")
    self.labels = np.asarray(labels, np.int32)

  def _resolve_missing(self, image: str) -> str | None:
    if self.missing_caption == "raise":
      raise FileNotFoundError(
        f"image {image!r} has no caption (no .txt beside it / no manifest entry); set "
        "config.data.missing_caption='skip' or 'empty' to accept this"
      )
    return None if self.missing_caption == "skip" else ""

  def _read_manifest(self, manifest: str):
    root = os.path.dirname(manifest)
    paths, captions, labels, sizes = [], [], [], []
    with open(manifest, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          name = next(row[k] for k in ("file_name", "image", "path") if k in row)
        except (json.JSONDecodeError, StopIteration, TypeError) as e:
          raise ValueError(
            f"{manifest}:{lineno}: expected a JSON object with 'file_name' (or 'image') and "
            f"'text' (or 'caption'), got {line.strip()[:200]!r}"
          ) from e
        image = os.path.join(root, name)
        caption = row.get("text", row.get("caption"))
        if caption is None:
          caption = self._resolve_missing(image)
          if caption is None:
            continue
        paths.append(image)
        captions.append(str(caption))
        labels.append(int(row.get("label", 0)))
        sizes.append(_manifest_size(row, manifest, lineno))
    self._sizes = sizes
    return paths, captions, labels

  def _scan_txt(self, root: str):
    paths, captions = [], []
    for image in _walk_images(root):
      txt = os.path.splitext(image)[0] + ".txt"
      if os.path.isfile(txt):
        caption = txt  # A path: read lazily in __getitem__ (millions of small files).
      else:
        if self._resolve_missing(image) is None:
          continue
        caption = ""  # No file to read.
      paths.append(image)
      captions.append(caption)
    return paths, captions, [0] * len(paths)

  def caption(self, index: int) -> str:
    c = self._captions[index]
    if self._caption_files and c:
      with open(c, encoding="utf-8") as f:
        return f.read().strip()
    return c

  def __len__(self) -> int:
    return len(self.paths)

  def image_sizes(self, num_threads: int = 8) -> np.ndarray:
    """(N, 2) (height, width) of every image: the manifest's, else from the file headers."""
    return read_image_sizes(self.paths, num_threads, known=self._sizes)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.paths[index], "label": self.labels[index], "caption": self.caption(index)}

  def __repr__(self) -> str:
    return f"CaptionFolderSource({self.root!r}, n={len(self)})"


def _manifest_size(row: dict, manifest: str, lineno: int) -> tuple[int, int] | None:
  """(height, width) of a manifest row that gives both, else None."""
  if "height" not in row or "width" not in row:
    return None
  try:
    height, width = int(row["height"]), int(row["width"])
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"{manifest}:{lineno}: 'height' and 'width' must be integers (pixels), got "
      f"{row['height']!r} and {row['width']!r}"
    ) from e
  if height < 1 or width < 1:
    raise ValueError(f"{manifest}:{lineno}: 'height' and 'width' must be positive")
  return height, width
