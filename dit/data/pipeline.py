"""The training input pipeline: one entry point, `make_train_iterator`.

Built on Grain's `MapDataset` over random-access sources (digits in memory,
`tfds.data_source`, image folders, precomputed latent shards):

  range(N).shuffle(seed).repeat()      stream of record indices, reshuffled per epoch
    .batch(G / P)                      sub-batch j = stream rows [j*G/P, (j+1)*G/P)
    .map_with_index(load_batch)        read + decode + preprocess; flips of global batch k
                                       drawn from (seed, k) for all G rows
    [p::P]                             process p reads sub-batches j = k*P + p only
    .to_iter_dataset(ReadOptions)      threaded prefetch, checkpointable state

So processes read disjoint records, the global batch (rows and flips) does not depend
on the process count, and the state (the next batch index) restores the exact next
batch. Sources with `read_batch(indices, flips)` (in-memory digits, memory-mapped
latents) are gathered with one vectorised read per batch.

With aspect-ratio buckets (config.data.buckets, image and caption folders; dit/data/buckets.py)
the record stream is replaced by a stream of global batches, each from one bucket:

  range(M * P).repeat()                sub-batch j of global batch k = j // P
    .map_with_index(load_bucket)       batch k's bucket and G rows from (seed, k): BucketBatches;
                                       rows [p*G/P, (p+1)*G/P) resized to cover the bucket, cropped
    [p::P] .to_iter_dataset(...)       as above

so every global batch has one shape, (G, h, w, C) for one of the buckets, and the state (the
next batch index) again restores the exact next batch, its bucket included.
"""

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from dit.data import buckets as buckets_lib
from dit.data import digits, preprocess
from dit.data.folders import CaptionFolderSource, ImageFolderSource
from dit.data.precomputed import PrecomputedSource

Batch = dict[str, np.ndarray]


class LabelError(ValueError):
  """A class label outside [0, num_classes) of the model."""


def _source_labels(source: Any) -> np.ndarray | None:
  """Every label of `source` where it holds them in memory (None: unknown without a scan)."""
  labels = getattr(source, "labels", None)
  return None if labels is None else np.asarray(labels)


def check_labels(source: Any, num_classes: int) -> None:
  """Raises LabelError if `source` has a class or a label outside [0, num_classes).

  Label num_classes is the model's null label (classifier-free guidance) and larger ones are
  outside its label table, so both would train silently wrong. Sources that know their
  classes (image folders, TFDS ClassLabel features) are checked by their class count, sources
  with labels in memory (digits, folders, captions, precomputed) label by label.
  """
  classes = getattr(source, "num_classes", None)
  if isinstance(classes, int | np.integer) and classes > num_classes:
    names = list(getattr(source, "classes", None) or range(classes))
    extra = ", ".join(f"{i} ({names[i]!r})" for i in range(num_classes, classes)[:3])
    more = f" and {classes - num_classes - 3} more" if classes - num_classes > 3 else ""
    raise LabelError(
      f"{source!r} has {classes} classes but config.model.num_classes={num_classes}: class "
      f"{extra}{more} would be outside [0, {num_classes}) (label {num_classes} is the null "
      f"label of classifier-free guidance); set --config.model.num_classes={classes}"
    )
  labels = _source_labels(source)
  if labels is not None and labels.size:
    _check_label_values(labels, num_classes, source)


def _check_label_values(labels: np.ndarray, num_classes: int, source: Any) -> None:
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if not bad.size:
    return
  i = int(bad[0])
  paths = getattr(source, "paths", None)
  what = f"image {paths[i]}" if paths is not None and i < len(paths) else f"record {i}"
  raise LabelError(
    f"label {int(labels[i])} ({what}; {bad.size} such labels) of {source!r} is outside "
    f"[0, {num_classes}) (config.model.num_classes={num_classes}; label {num_classes} is the "
    "null label of classifier-free guidance); fix the labels or set config.model.num_classes"
  )


def collate(records: Sequence[dict]) -> Batch:
  """Stacks record dicts into a batch; str values become a str array.

  "label" and "text_mask" become int32; "image", "latent" and "text" float32.
  """
  batch = {}
  for key in records[0]:
    values = [r[key] for r in records]
    if isinstance(values[0], str):
      batch[key] = np.array(values, dtype=str)
    else:
      batch[key] = np.stack([np.asarray(v) for v in values])
  return collate_arrays(batch)


def collate_arrays(batch: Batch) -> Batch:
  """Casts "label", "text_mask" to int32 and "image", "latent", "text", "repa" to float32."""
  for key in ("label", "text_mask"):
    if key in batch:
      batch[key] = np.asarray(batch[key]).astype(np.int32, copy=False)
  for key in ("image", "latent", "text", "repa"):
    if key in batch:
      batch[key] = np.asarray(batch[key]).astype(np.float32, copy=False)
  return batch


class Loader:
  """Record index + flip bit -> training example: decode, preprocess, flip; skips bad files.

  Args:
    source: random-access source; records hold "image" (float array in [-1, 1] already
      at resolution, or uint8 array / encoded bytes / path to decode), or "latent"
      (2, h, w, c): [unflipped, flipped].
    resolution, channels: output image size for decoded images.
    random_flip: flip with probability 1/2.
    on_bad_image: "skip" (use the next readable record; counted and logged) or "raise".
    text_embedder: optional captions (B,) -> (text (B, L, D), text_mask (B, L)), e.g. a
      `dit.data.text.CaptionEmbedder`; batches with a "caption" then also get "text" and
      "text_mask" (unless the source already stores them).
    num_classes: labels must lie in [0, num_classes) (each batch is checked: a LabelError);
      None: not checked.
  """

  def __init__(
    self,
    source: Any,
    *,
    resolution: int,
    channels: int,
    random_flip: bool,
    on_bad_image: str = "skip",
    text_embedder: Any = None,
    num_classes: int | None = None,
  ):
    if on_bad_image not in ("skip", "raise"):
      raise ValueError(f"on_bad_image must be 'skip' or 'raise', got {on_bad_image!r}")
    self.source = source
    self.resolution = resolution
    self.channels = channels
    self.random_flip = random_flip
    self.on_bad_image = on_bad_image
    self.text_embedder = text_embedder
    self.num_classes = num_classes
    self.bad_indices = set()  # Unreadable records seen (prefetching may read ahead).
    self._lock = threading.Lock()

  def example(self, record: dict, flip: bool, size: tuple[int, int] | None = None) -> dict:
    """One record, decoded and preprocessed to `size` (height, width) or the square resolution."""
    out = dict(record)
    if "latent" in record:
      for key in ("latent", "repa"):  # Stored as [unflipped, flipped].
        if key in record:
          out[key] = record[key][int(flip)]
      return out
    image = record["image"]
    if isinstance(image, np.ndarray) and image.dtype == np.float32:
      # Already preprocessed in [-1, 1] (digits): only channels and flip.
      if image.shape[-1] != self.channels:
        image = np.repeat(image.mean(-1, keepdims=True), self.channels, axis=-1)
      out["image"] = image[:, ::-1] if flip else image
      return out
    if not isinstance(image, np.ndarray):
      image = preprocess.open_image(image)
    target = self.resolution if size is None else size
    out["image"] = preprocess.preprocess(image, target, self.channels, flip)
    return out

  def __call__(self, index: int, flip: bool = False, size: tuple[int, int] | None = None) -> dict:
    """One example: record `index` (or the next readable one), flipped if `flip`, of `size`
    (height, width; default: the square resolution): a replacement for an unreadable record
    is cropped to the same size, so a bucket's batch keeps its shape."""
    n = len(self.source)
    for attempt in range(min(n, 100)):
      i = (int(index) + attempt) % n
      try:
        return self.example(self.source[i], flip, size)
      except preprocess.DECODE_ERRORS as e:
        what = self.source.paths[i] if hasattr(self.source, "paths") else f"record {i}"
        if self.on_bad_image == "raise":
          raise ValueError(
            f"cannot decode image {what} of {self.source!r}: {e}; set "
            "config.data.on_bad_image='skip' to skip unreadable files"
          ) from e
        with self._lock:
          new = i not in self.bad_indices
          self.bad_indices.add(i)
        if new:
          logging.warning("skipping unreadable image %s (%s: %s)", what, type(e).__name__, e)
    raise ValueError(f"{self.source!r}: 100 consecutive records are unreadable, from {index}")

  def load_batch(
    self, indices: np.ndarray, flips: np.ndarray, size: tuple[int, int] | None = None
  ) -> Batch:
    """Records `indices` (B,) -> batch, row i flipped where `flips[i]`; images of `size`
    (height, width; an aspect-ratio bucket, decoded sources only) or the square resolution."""
    if size is not None:
      batch = collate([self(i, f, size) for i, f in zip(indices, flips, strict=True)])
    elif not hasattr(self.source, "read_batch"):
      batch = collate([self(i, f) for i, f in zip(indices, flips, strict=True)])
    else:
      batch = dict(self.source.read_batch(indices, flips))
      if "image" in batch and batch["image"].shape[-1] != self.channels:
        image = batch["image"]
        batch["image"] = np.repeat(image.mean(-1, keepdims=True), self.channels, axis=-1)
      batch = collate_arrays(batch)
    if self.num_classes is not None and "label" in batch:
      _check_label_values(batch["label"], self.num_classes, self.source)
    return self._embed_captions(batch)

  def _embed_captions(self, batch: Batch) -> Batch:
    if self.text_embedder is not None and "caption" in batch and "text" not in batch:
      text, mask = self.text_embedder(batch["caption"])
      batch["text"] = np.asarray(text, np.float32)
      batch["text_mask"] = np.asarray(mask, np.int32)
    return batch


class TrainIterator(Iterator[Batch]):
  """Infinite, checkpointable iterator over this process's rows of each global batch.

  buckets: aspect-ratio buckets (`buckets.BucketBatches` of this global batch size and seed):
  each global batch is one bucket's, of its (height, width); None: square images.
  """

  def __init__(
    self,
    loader: Loader,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 0,
    prefetch: int | None = None,
    buckets: buckets_lib.BucketBatches | None = None,
  ):
    n = len(loader.source)
    if n == 0:
      raise ValueError(f"data source {loader.source!r} is empty")
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(
        f"global_batch_size={global_batch_size} must be positive and divisible by "
        f"process_count={process_count}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if not 0 <= seed < 2**32:
      raise ValueError(f"data seed must be in [0, 2**32), got {seed}")
    self.loader = loader
    self.num_records = n
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = int(seed)
    self.process_index = process_index
    self.process_count = process_count
    self.buckets = buckets
    if buckets is None:
      ds = grain.MapDataset.range(n).shuffle(seed=self.seed).repeat(None)
      ds = ds.batch(self.local_batch_size, batch_fn=np.asarray)
      ds = ds.map_with_index(self._load)[process_index::process_count]
    else:
      if (buckets.global_batch_size, buckets.seed) != (global_batch_size, self.seed):
        raise ValueError(
          f"buckets are planned for global batch {buckets.global_batch_size} and seed "
          f"{buckets.seed}, not {global_batch_size} and {self.seed}"
        )
      ds = grain.MapDataset.range(buckets.batches_per_epoch * process_count).repeat(None)
      ds = ds.map_with_index(self._load_bucket)[process_index::process_count]
    self.dataset = ds  # dataset[k]: this process's rows of global batch k.
    prefetch = max(4, num_threads) if prefetch is None else prefetch
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._it = iter(ds.to_iter_dataset(read))

  def _load(self, sub_batch: int, indices: np.ndarray, size=None) -> Batch:
    step, part = divmod(sub_batch, self.process_count)
    flips = np.zeros(len(indices), bool)
    if self.loader.random_flip:
      # Drawn for the whole global batch, so they do not depend on the process count.
      every = np.random.default_rng([self.seed, 1, step]).random(self.global_batch_size) < 0.5
      flips = every[part * self.local_batch_size : (part + 1) * self.local_batch_size]
    return self.loader.load_batch(indices, flips, size)

  def _load_bucket(self, sub_batch: int, _) -> Batch:
    step, part = divmod(sub_batch, self.process_count)
    bucket, rows = self.buckets[step]
    rows = rows[part * self.local_batch_size : (part + 1) * self.local_batch_size]
    return self._load(sub_batch, rows, tuple(int(v) for v in self.buckets.table[bucket]))

  @property
  def num_bad_images(self) -> int:
    """Distinct unreadable images found so far (on_bad_image="skip"), read-ahead included."""
    return len(self.loader.bad_indices)

  def __next__(self) -> Batch:
    return next(self._it)

  @property
  def bucket_sizes(self) -> list[list[int]] | None:
    """[[height, width], ...] of the buckets batches come from; None without buckets."""
    return None if self.buckets is None else [list(s) for s in self.buckets.sizes()]

  def get_state(self) -> dict:
    """JSON-serialisable state; `set_state` of it resumes at the exact next batch (with
    buckets: "buckets" lists their sizes, and the next batch's bucket follows from "step")."""
    state = {
      "step": int(self._it.get_state()["next_index"]),
      "seed": self.seed,
      "global_batch_size": self.global_batch_size,
      "num_records": self.num_records,
    }
    if self.buckets is not None:
      state["buckets"] = self.bucket_sizes
    return state

  def set_state(self, state: dict) -> None:
    for key in ("seed", "global_batch_size", "num_records"):
      if key in state and state[key] != getattr(self, key):
        raise ValueError(
          f"iterator state has {key}={state[key]!r} but this pipeline has "
          f"{key}={getattr(self, key)!r}; cannot resume a different data stream"
        )
    saved = state.get("buckets")
    saved = None if saved is None else [list(s) for s in saved]
    if ("buckets" in state or self.buckets is not None) and saved != self.bucket_sizes:
      raise ValueError(
        f"iterator state has aspect-ratio buckets {saved} but this pipeline has "
        f"{self.bucket_sizes}; cannot resume a different data stream"
      )
    step = int(state["step"])
    if step < 0:
      raise ValueError(f"iterator state step must be >= 0, got {step}")
    self._it.set_state({"next_index": step})

  def close(self) -> None:
    self._it.close()


def make_source(data_config: Any) -> Any:
  """The random-access source named by `config.data.name`."""
  get = data_config.get
  name = get("name", "digits")
  if name == "digits":
    return digits.DigitsSource(get("resolution", 16), captions=get("captions", False))
  if name.startswith("tfds:"):
    from dit.data import tfds  # Lazy: TFDS import is slow and an optional extra.

    return tfds.TfdsSource(
      name.removeprefix("tfds:"),
      split=get("split", "train"),
      data_dir=get("data_dir", None),
      image_key=get("image_key", "image"),
      label_key=get("label_key", "label"),
      caption_key=get("caption_key", None),
    )
  if name in ("folder", "captions", "precomputed"):
    path = get("path", None)
    if not path:
      raise ValueError(f"config.data.name={name!r} needs config.data.path")
    if name == "folder":
      return ImageFolderSource(path)
    if name == "captions":
      return CaptionFolderSource(path, missing_caption=get("missing_caption", "raise"))
    return PrecomputedSource(path)
  raise ValueError(
    f"unknown config.data.name={name!r}; expected 'digits', 'tfds:<name>', 'folder', "
    "'captions' or 'precomputed'"
  )


def _text_embedder(data_config: Any, source: Any) -> Any:
  """A caption embedder for `config.data.text`, or None (no text encoder configured)."""
  text_config = data_config.get("text", None)
  if not text_config:
    return None
  from dit.data import text  # Lazy: imports JAX and the T5 code.

  embedder = text.CaptionEmbedder(text.make_text_encoder(text_config))
  want = data_config.get("max_text_length", None)
  if want is not None and want != embedder.encoder.max_length:
    raise ValueError(
      f"config.data.max_text_length={want} but the text encoder pads to "
      f"config.data.text.max_length={embedder.encoder.max_length}; make them equal"
    )
  if hasattr(source, "all_captions"):
    embedder.prefill(source.all_captions())
  return embedder


def make_buckets(
  data_config: Any,
  source: Any,
  *,
  global_batch_size: int,
  seed: int,
  size_multiple: int = 1,
) -> buckets_lib.BucketBatches | None:
  """The aspect-ratio buckets of config.data.buckets (None when off) for `source`.

  Reads config.data.resolution (the base square), bucket_divisor (0: `default_divisor` of
  the resolution and size_multiple), bucket_max_ratio and num_threads (to read the image
  headers). size_multiple: every bucket side must be a multiple of it (the model's patch
  size). Images whose size cannot be read go to the square bucket (and are skipped when read).
  """
  get = data_config.get
  if not get("buckets", False):
    return None
  if not hasattr(source, "image_sizes"):
    raise ValueError(
      f"config.data.buckets=True needs images of their own sizes: an image folder or caption "
      f"folder (config.data.name='folder' or 'captions'), not name={get('name', 'digits')!r}"
    )
  base = get("resolution", 256)
  divisor = get("bucket_divisor", 0) or buckets_lib.default_divisor(base, size_multiple)
  if divisor % size_multiple:
    raise ValueError(
      f"config.data.bucket_divisor={divisor} must be a multiple of the model's patch size "
      f"{size_multiple} (every bucket side is a whole number of patches)"
    )
  try:
    table = buckets_lib.bucket_table(
      base, divisor, max_ratio=get("bucket_max_ratio", buckets_lib.DEFAULT_MAX_RATIO)
    )
  except ValueError as e:
    raise ValueError(f"config.data.resolution / bucket_divisor / bucket_max_ratio: {e}") from e
  sizes = source.image_sizes(get("num_threads", 8))
  known = sizes.min(axis=1) > 0
  heights, widths = np.where(known, sizes[:, 0], 1), np.where(known, sizes[:, 1], 1)
  plan = buckets_lib.BucketBatches(
    buckets_lib.nearest_bucket(heights, widths, table), table, global_batch_size, seed
  )
  logging.info(
    "aspect-ratio buckets: %d of %d hold images, (height, width): %s",
    len(plan.buckets),
    len(table),
    ", ".join(f"{h}x{w}: {len(m)}" for (h, w), m in zip(plan.sizes(), plan.members, strict=True)),
  )
  return plan


def make_train_iterator(
  data_config: Any,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_classes: int | None = None,
  size_multiple: int = 1,
) -> TrainIterator:
  """Builds the infinite training iterator for `data_config` on this process.

  Args:
    data_config: `config.data` (ConfigDict or dict); fields are read with defaults,
      see docs in README / `make_source`.
    global_batch_size: rows per step summed over processes.
    seed: data order and augmentation seed, in [0, 2**32).
    process_index, process_count: this host's slot, e.g. `jax.process_index()`.
    num_classes: the model's number of classes: a class or label of the source outside
      [0, num_classes) is a LabelError, now where the source knows its labels, else when the
      batch is read. None (unconditional and text models): labels are not checked.
    size_multiple: with config.data.buckets, every bucket side is a multiple of it (the
      model's patch size; `make_buckets`).

  Returns:
    TrainIterator yielding {"image": (B_local, R, R, C) float32 in [-1, 1] (with buckets:
    (B_local, h, w, C), one bucket's (h, w) per global batch; or
    "latent": (B_local, h, w, c) float32), "label": (B_local,) int32, optionally
    "caption": (B_local,) str, "text": (B_local, L, D) float32, "text_mask": (B_local, L) int32}.
  """
  get = data_config.get
  name = get("name", "digits")
  is_digits = name == "digits"
  source = make_source(data_config)
  if num_classes is not None:
    check_labels(source, num_classes)
  loader = Loader(
    source,
    resolution=get("resolution", 16 if is_digits else 256),
    channels=get("channels", 1 if is_digits else 3),
    random_flip=get("random_flip", not is_digits),
    on_bad_image=get("on_bad_image", "skip"),
    text_embedder=_text_embedder(data_config, source),
    num_classes=num_classes,
  )
  in_memory = is_digits or name == "precomputed"
  return TrainIterator(
    loader,
    global_batch_size=global_batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    num_threads=get("num_threads", 0 if in_memory else 8),
    prefetch=get("prefetch", None),
    buckets=make_buckets(
      data_config,
      source,
      global_batch_size=global_batch_size,
      seed=seed,
      size_multiple=size_multiple,
    ),
  )
