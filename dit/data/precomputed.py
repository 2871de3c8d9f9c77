"""Precomputed datasets on disk (written by `python -m dit.data.precompute`), read back.

Layout of a dataset directory DIR:
  DIR/meta.json                                    counts, shapes, dtype, shard size
  DIR/latent-SSSSS-of-NNNNN.npy   (n, 2, h, w, c)  [unflipped, flipped], VAE scale applied
  DIR/label-SSSSS-of-NNNNN.npy    (n,) int32
  DIR/text-SSSSS-of-NNNNN.npy     (n, L, D)        only with a text encoder and captions
  DIR/text_mask-SSSSS-of-NNNNN.npy (n, L) int32
  DIR/repa-SSSSS-of-NNNNN.npy     (n, 2, Np, D)    DINOv2 patch features [unflipped, flipped],
                                                   with --repa_encoder; meta.json's "repa"
                                                   records encoder, resolution, Np and D
Shard s holds records [s*shard_size, (s+1)*shard_size). The writer is dit/data/precompute.py;
this module is the format and the reader, which needs only NumPy.
"""

import json
import os

import numpy as np

META = "meta.json"
FIELDS = ("latent", "label", "text", "text_mask", "repa")
_FLIPPED = ("latent", "repa")  # Fields stored as [unflipped, flipped] per record.


def shard_name(field: str, shard: int, num_shards: int) -> str:
  """The file name of shard `shard` (of `num_shards`) of `field`, e.g. latent-00000-of-00004.npy."""
  return f"{field}-{shard:05d}-of-{num_shards:05d}.npy"


class PrecomputedSource:
  """Random access to precomputed shards: {"latent": (2, h, w, c), "label"[, "text", "text_mask",
  "repa": (2, Np, D)]}.

  Shards are memory-mapped, so a record read touches only its own bytes.
  """

  def __init__(self, path: str):
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(
        f"{meta_path!r} not found: {path!r} is not a precomputed dataset; create one with "
        "`python -m dit.data.precompute --config=... --out=DIR`"
      )
    with open(meta_path) as f:
      self.meta = json.load(f)
    self.path = path
    self.num_records = self.meta["num_records"]
    self.shard_size = self.meta["shard_size"]
    num_shards = self.meta["num_shards"]
    self.fields = [
      f for f in FIELDS if os.path.exists(os.path.join(path, shard_name(f, 0, num_shards)))
    ]
    if "latent" not in self.fields:
      raise FileNotFoundError(f"precomputed dataset {path!r} has no latent shards")
    self.arrays = {}
    for field in self.fields:
      names = [shard_name(field, s, num_shards) for s in range(num_shards)]
      missing = [m for m in names if not os.path.exists(os.path.join(path, m))]
      if missing:
        raise FileNotFoundError(
          f"precomputed dataset {path!r} lacks {len(missing)} of {num_shards} {field} shards "
          f"(e.g. {missing[0]}); finish the precompute run (it resumes) on all processes"
        )
      self.arrays[field] = [np.load(os.path.join(path, m), mmap_mode="r") for m in names]
    sizes = [len(a) for a in self.arrays["latent"]]
    if sum(sizes) != self.num_records:
      raise ValueError(
        f"precomputed dataset {path!r}: shards hold {sum(sizes)} records, meta.json says "
        f"{self.num_records}"
      )

  @property
  def labels(self) -> np.ndarray | None:
    """Every record's label (num_records,), None if the dataset stores none."""
    if "label" not in self.arrays:
      return None
    return np.concatenate([np.asarray(a) for a in self.arrays["label"]])

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict:
    shard, offset = divmod(int(index), self.shard_size)
    return {field: np.asarray(self.arrays[field][shard][offset]) for field in self.fields}

  def read_batch(self, indices: np.ndarray, flips: np.ndarray) -> dict:
    """Vectorised read of records `indices` (B,), one gather per shard touched.

    Returns {"latent": (B, h, w, c), the flipped copy where `flips` (B,) bool, "label": (B,)
    [, "text": (B, L, D), "text_mask": (B, L), "repa": (B, Np, D) of the same flip]}; only the
    chosen flip is read from disk.
    """
    shards, offsets = np.divmod(np.asarray(indices, np.int64), self.shard_size)
    flips = np.asarray(flips, np.intp)
    out = {}
    for field in self.fields:
      first = self.arrays[field][0]
      shape = first.shape[2:] if field in _FLIPPED else first.shape[1:]
      values = np.empty((len(indices), *shape), first.dtype)
      for shard in np.unique(shards):
        sel = shards == shard
        if field in _FLIPPED:
          values[sel] = self.arrays[field][shard][offsets[sel], flips[sel]]
        else:
          values[sel] = self.arrays[field][shard][offsets[sel]]
      out[field] = values
    return out

  def __repr__(self) -> str:
    return f"PrecomputedSource({self.path!r}, n={len(self)}, fields={self.fields})"
