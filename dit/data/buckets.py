"""Aspect-ratio buckets for multi-aspect training (PixArt-Sigma style) and their batch plan.

A bucket table is a fixed list of (height, width) sizes in pixels, multiples of `divisor`,
at roughly the area of a base square: every such pair with

  min_area * base**2 <= height * width <= base**2,   1 / max_ratio <= height / width <= max_ratio.

The table depends only on base / divisor (the side in grid units): base 1024 with divisor 64,
512 with 32 and 256 with 16 give the same 41 buckets, scaled, and they hold every entry of
PixArt's ASPECT_RATIO_1024 / 512 / 256 tables (diffusers' ASPECT_RATIO_*_BIN: 33 entries) and of
PixArt-Sigma's ASPECT_RATIO_2048 table (scaled) plus the transposes those tables leave out, so
that a tall and a wide image of the same shape get transposed buckets.

Each image goes to the bucket nearest its aspect ratio, |log(h / w) - log(h_b / w_b)| (ties:
the larger area); it is then resized to cover the bucket and center-cropped (`preprocess`).

`BucketBatches` turns the bucket of each record into a deterministic stream of global batches,
each from one bucket: epoch e shuffles every bucket's records and the order of all its batches
from (seed, e) alone, so batch k (bucket and rows) does not depend on the process count and is
recomputed from k on resume. Buckets with fewer records than a global batch are merged into the
nearest bucket that has enough (a batch of G rows needs G records of one shape).
"""

import functools
import math

import numpy as np

DEFAULT_MAX_RATIO = 4.0  # PixArt's tables span aspect ratios 1/4 .. 4.
DEFAULT_MIN_AREA = 0.9  # ... and areas 0.9 .. 1.0 of the base square.


def bucket_table(
  base: int,
  divisor: int,
  *,
  max_ratio: float = DEFAULT_MAX_RATIO,
  min_area: float = DEFAULT_MIN_AREA,
) -> np.ndarray:
  """The buckets for `base` x `base` pixel images: (K, 2) int64 (height, width) in pixels.

  Rows are sorted by aspect ratio height / width, then area; the base square is always one.

  Args:
    base: the side of the square training resolution, in pixels (config.data.resolution);
      a multiple of `divisor`.
    divisor: every height and width is a multiple of it: the model's patch size (times the VAE
      factor for latents), or coarser for fewer buckets.
    max_ratio: the longest side is at most max_ratio times the shortest, >= 1.
    min_area: the smallest bucket area as a fraction of base**2, in (0, 1].
  """
  for name, value in (("base", base), ("divisor", divisor)):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
      raise ValueError(f"bucket {name} must be a positive integer, got {value!r}")
  if base % divisor:
    raise ValueError(
      f"bucket base resolution {base} must be a multiple of the divisor {divisor} (the square "
      "training size is a bucket)"
    )
  if not max_ratio >= 1.0:
    raise ValueError(f"bucket max_ratio must be >= 1, got {max_ratio}")
  if not 0.0 < min_area <= 1.0:
    raise ValueError(f"bucket min_area must be in (0, 1], got {min_area}")
  units = base // divisor
  area = units * units
  sizes = []
  for h in range(1, math.isqrt(int(max_ratio * area)) + 2):
    # Widths with min_area * area <= h * w <= area, and the ratio bound.
    lo = max(1, math.ceil(min_area * area / h), math.ceil(h / max_ratio))
    hi = min(area // h, math.floor(h * max_ratio))
    sizes.extend((h, w) for w in range(lo, hi + 1))
  table = np.asarray(sorted(sizes, key=lambda s: (s[0] / s[1], s[0] * s[1])), np.int64)
  return table * divisor


def default_divisor(base: int, multiple: int = 1) -> int:
  """PixArt's grid: the largest multiple of `multiple` that divides `base` and is at most
  base / 16 (16 units a side, the 41 buckets of PixArt's tables); else `multiple` itself
  (coarser grids give fewer buckets, finer ones more)."""
  for d in range(base // 16 // multiple * multiple, 0, -multiple):
    if base % d == 0:
      return d
  return multiple


def nearest_bucket(heights, widths, table: np.ndarray) -> np.ndarray:
  """Index of the bucket of each image, nearest by log aspect ratio (ties: larger area).

  Args:
    heights, widths: (N,) image sizes in pixels, positive.
    table: (K, 2) (height, width) buckets, e.g. `bucket_table`.

  Returns:
    (N,) int64 indices into `table`.
  """
  h = np.asarray(heights, np.float64).reshape(-1)
  w = np.asarray(widths, np.float64).reshape(-1)
  if h.shape != w.shape:
    raise ValueError(f"heights {h.shape} and widths {w.shape} must have the same length")
  if np.any(h <= 0) or np.any(w <= 0):
    raise ValueError("image heights and widths must be positive")
  table = np.asarray(table)
  log_ratio = np.log(table[:, 0] / table[:, 1])
  dist = np.abs(np.log(h / w)[:, None] - log_ratio[None, :])
  # Ratios within 1e-9 of the nearest are ties (e.g. squares of two areas): the larger area wins.
  area = table[:, 0].astype(np.float64) * table[:, 1]
  tied = dist <= dist.min(axis=1, keepdims=True) + 1e-9
  return np.argmax(np.where(tied, area[None, :], -1.0), axis=1).astype(np.int64)


def merge_small_buckets(counts, table: np.ndarray, min_count: int) -> np.ndarray:
  """Where each bucket's records go: (K,) int64 target bucket, itself if it is kept.

  Buckets with fewer than `min_count` records (but some) move to the nearest bucket, by log
  aspect ratio, that has at least min_count; if none has, everything goes to the most
  populous bucket (ties: the one nearest square).
  """
  counts = np.asarray(counts, np.int64)
  table = np.asarray(table)
  log_ratio = np.log(table[:, 0] / table[:, 1])
  target = np.arange(len(counts), dtype=np.int64)
  big = np.flatnonzero(counts >= min_count)
  if not big.size:
    order = np.lexsort((np.abs(log_ratio), -counts))  # Most records, then nearest square.
    return np.full(len(counts), order[0], np.int64)
  for b in np.flatnonzero((counts > 0) & (counts < min_count)):
    target[b] = big[np.argmin(np.abs(log_ratio[big] - log_ratio[b]))]
  return target


class BucketBatches:
  """Global batch k -> (bucket index, (G,) record indices); pure in (seed, k).

  Args:
    assignment: (N,) bucket index of every record (`nearest_bucket`).
    table: (K, 2) bucket sizes (height, width).
    global_batch_size: G rows per batch, all of one bucket.
    seed: in [0, 2**32).

  Epoch e holds sum_b max(1, n_b // G) batches over the kept buckets b (n_b records after
  merging): bucket b's records are shuffled by (seed, e, b) and cut into batches of G
  (the last n_b mod G are left out of this epoch, different ones each epoch; a bucket of
  fewer than G, only when the whole source is smaller than G, wraps around), and all the
  epoch's batches are shuffled by (seed, e).
  """

  def __init__(self, assignment, table: np.ndarray, global_batch_size: int, seed: int):
    self.table = np.asarray(table, np.int64)
    assignment = np.asarray(assignment, np.int64)
    if assignment.size == 0:
      raise ValueError("cannot bucket an empty source")
    g = int(global_batch_size)
    counts = np.bincount(assignment, minlength=len(self.table))
    self.assignment = merge_small_buckets(counts, self.table, g)[assignment]
    self.global_batch_size = g
    self.seed = int(seed)
    self.buckets = np.unique(self.assignment)  # The buckets that hold records.
    self.members = [np.flatnonzero(self.assignment == b) for b in self.buckets]
    self.batches_per_bucket = np.asarray([max(1, len(m) // g) for m in self.members], np.int64)
    self.batches_per_epoch = int(self.batches_per_bucket.sum())
    self._epoch = functools.lru_cache(maxsize=4)(self._make_epoch)

  def sizes(self) -> list[tuple[int, int]]:
    """The (height, width) of every bucket that holds records: the batch shapes."""
    return [tuple(int(v) for v in self.table[b]) for b in self.buckets]

  def _make_epoch(self, epoch: int):
    """(order: (M, 2) (kept bucket slot, batch within it), per-slot shuffled records)."""
    perms = [
      members[np.random.default_rng([self.seed, 3, epoch, int(b)]).permutation(len(members))]
      for b, members in zip(self.buckets, self.members, strict=True)
    ]
    slots = np.repeat(np.arange(len(self.buckets)), self.batches_per_bucket)
    within = np.concatenate([np.arange(n) for n in self.batches_per_bucket])
    order = np.stack([slots, within], axis=1)
    order = order[np.random.default_rng([self.seed, 2, epoch]).permutation(len(order))]
    return order, perms

  def __getitem__(self, k: int) -> tuple[int, np.ndarray]:
    """(bucket index into the table, (G,) record indices) of global batch k >= 0."""
    epoch, j = divmod(int(k), self.batches_per_epoch)
    order, perms = self._epoch(epoch)
    slot, i = (int(v) for v in order[j])
    perm = perms[slot]
    rows = perm[(i * self.global_batch_size + np.arange(self.global_batch_size)) % len(perm)]
    return int(self.buckets[slot]), rows
