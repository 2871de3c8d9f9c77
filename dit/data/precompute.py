"""Encode a dataset once (VAE latents of both flips, T5 embeddings) and stream it back.

  python -m dit.data.precompute --config=configs/imagenet256_dit.py --out=DIR \
      [--vae=DIR] [--t5=DIR] [--batch_size=64] [--shard_size=4096] [--dtype=float16]

Output (fast-DiT style, one sample of the VAE posterior per image and flip):
  DIR/meta.json                                    counts, shapes, dtype, shard size
  DIR/latent-SSSSS-of-NNNNN.npy   (n, 2, h, w, c)  [unflipped, flipped], VAE scale applied
  DIR/label-SSSSS-of-NNNNN.npy    (n,) int32
  DIR/text-SSSSS-of-NNNNN.npy     (n, L, D)        only with a text encoder and captions
  DIR/text_mask-SSSSS-of-NNNNN.npy (n, L) int32
Shard s holds records [s*shard_size, (s+1)*shard_size). Process p of P writes shards
s = p (mod P); finished shards are skipped, so a killed run resumes where it stopped.
`PrecomputedSource(DIR)` reads them back through memory maps (the fast training path).
"""

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

META = "meta.json"
FIELDS = ("latent", "label", "text", "text_mask")

EncodeImages = Callable[[np.ndarray, Any], np.ndarray]  # (B,H,W,3) [-1,1], key -> (B,h,w,c)
EncodeText = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # -> (B,L,D), (B,L)


def shard_name(field: str, shard: int, num_shards: int) -> str:
  return f"{field}-{shard:05d}-of-{num_shards:05d}.npy"


def _save_atomic(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)  # A killed run never leaves a half-written shard.


def precompute(
  source: Any,
  out_dir: str,
  *,
  encode_images: EncodeImages,
  encode_text: EncodeText | None = None,
  resolution: int = 256,
  channels: int = 3,
  batch_size: int = 64,
  shard_size: int = 4096,
  seed: int = 0,
  dtype: str = "float32",
  process_index: int = 0,
  process_count: int = 1,
  on_bad_image: str = "raise",
) -> dict:
  """Encodes `source` into .npy shards under `out_dir`; returns the metadata dict.

  Args:
    source: random-access source (see dit.data.pipeline.make_source).
    encode_images: (B, R, R, C) float32 in [-1, 1], jax key -> (B, h, w, c) scaled latents.
      Called once per batch on [images; flipped images] (2B rows).
    encode_text: list of B captions -> (embeddings (B, L, D), mask (B, L)); used when
      records have a "caption".
    seed: the posterior-sample key of the batch starting at record i is
      fold_in(key(seed), i): the output depends on (seed, batch_size), not on process_count.
    dtype: storage dtype of latents and text embeddings ("float32" or "float16").
  """
  import jax  # Lazy: reading shards back needs no JAX.

  from dit.data.pipeline import Loader

  if dtype not in ("float32", "float16"):
    raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
  if shard_size <= 0 or batch_size <= 0:
    raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be positive")
  store = np.dtype(dtype)
  n = len(source)
  if n == 0:
    raise ValueError(f"data source {source!r} is empty")
  num_shards = -(-n // shard_size)
  loader = Loader(
    source, resolution=resolution, channels=channels, random_flip=False, on_bad_image=on_bad_image
  )
  os.makedirs(out_dir, exist_ok=True)
  key = jax.random.key(seed)
  shapes = {}
  for shard in range(process_index, num_shards, process_count):
    paths = {f: os.path.join(out_dir, shard_name(f, shard, num_shards)) for f in FIELDS}
    if os.path.exists(paths["label"]):
      continue  # Written by an earlier run (label is saved last).
    lo, hi = shard * shard_size, min((shard + 1) * shard_size, n)
    outs = {f: [] for f in FIELDS}
    for start in range(lo, hi, batch_size):
      records = [loader(i) for i in range(start, min(start + batch_size, hi))]
      images = np.stack([r["image"] for r in records]).astype(np.float32)
      both = np.concatenate([images, images[:, :, ::-1]])
      latents = np.asarray(encode_images(both, jax.random.fold_in(key, start)), np.float32)
      b = len(records)
      outs["latent"].append(np.stack([latents[:b], latents[b:]], axis=1).astype(store))
      outs["label"].append(np.asarray([r["label"] for r in records], np.int32))
      if encode_text is not None and "caption" in records[0]:
        emb, mask = encode_text([r["caption"] for r in records])
        outs["text"].append(np.asarray(emb, np.float32).astype(store))
        outs["text_mask"].append(np.asarray(mask).astype(np.int32))
    for field in ("latent", "text", "text_mask", "label"):
      if outs[field]:
        array = np.concatenate(outs[field])
        shapes[field] = list(array.shape[1:])
        _save_atomic(paths[field], array)
    logging.info("precompute: wrote shard %d of %d (records %d..%d)", shard, num_shards, lo, hi)
  meta = {
    "num_records": n,
    "shard_size": shard_size,
    "num_shards": num_shards,
    "dtype": str(store),
    "resolution": resolution,
    "fields": sorted(shapes) or None,
    "shapes": shapes,
  }
  if process_index == 0:
    with open(os.path.join(out_dir, META), "w") as f:
      json.dump(meta, f, indent=2)
  return meta


class PrecomputedSource:
  """Random access to precomputed shards: {"latent": (2, h, w, c), "label"[, "text", "text_mask"]}.

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

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict:
    shard, offset = divmod(int(index), self.shard_size)
    return {field: np.asarray(self.arrays[field][shard][offset]) for field in self.fields}

  def read_batch(self, indices: np.ndarray, flips: np.ndarray) -> dict:
    """Vectorised read of records `indices` (B,), one gather per shard touched.

    Returns {"latent": (B, h, w, c), the flipped copy where `flips` (B,) bool, "label": (B,)
    [, "text": (B, L, D), "text_mask": (B, L)]}; only the chosen flip is read from disk.
    """
    shards, offsets = np.divmod(np.asarray(indices, np.int64), self.shard_size)
    flips = np.asarray(flips, np.intp)
    out = {}
    for field in self.fields:
      first = self.arrays[field][0]
      shape = first.shape[2:] if field == "latent" else first.shape[1:]
      values = np.empty((len(indices), *shape), first.dtype)
      for shard in np.unique(shards):
        sel = shards == shard
        if field == "latent":
          values[sel] = self.arrays[field][shard][offsets[sel], flips[sel]]
        else:
          values[sel] = self.arrays[field][shard][offsets[sel]]
      out[field] = values
    return out

  def __repr__(self) -> str:
    return f"PrecomputedSource({self.path!r}, n={len(self)}, fields={self.fields})"


# ----------------------------------------------------------------------------- command line


def load_encoders(
  vae: str, t5: str | None = None, text_len: int = 120
) -> tuple[EncodeImages, EncodeText | None]:
  """Precompute callables from dit.models: the VAE (posterior sample, scale applied) and T5.

  Args:
    vae: diffusers AutoencoderKL directory, or "identity" to store pixels as they are
      (pixel-space models, e.g. text embeddings only for digits).
    t5: T5 directory (TextEncoder.from_pretrained), "demo" (the offline random T5 of
      `TextEncoder.offline_demo`), or None for no text.
  """
  import jax.numpy as jnp

  if vae == "identity":
    encode_images = lambda images, key: np.asarray(images, np.float32)
  else:
    from dit.models.vae import VAE

    model = VAE.load(vae)
    encode_images = lambda images, key: np.asarray(model.encode(jnp.asarray(images), key))
  encode_text = None
  if t5:
    from dit.models.t5 import TextEncoder

    if t5 == "demo":
      text = TextEncoder.offline_demo(max_length=text_len)
    else:
      text = TextEncoder.from_pretrained(t5, max_length=text_len)
    encode_text = lambda captions: tuple(np.asarray(a) for a in text.encode(list(captions)))
  return encode_images, encode_text


def main(argv: list[str]) -> None:
  del argv
  from absl import flags

  from dit.data.pipeline import make_source

  f = flags.FLAGS
  cfg = f.config
  encode_images, encode_text = load_encoders(f.vae, f.t5, f.text_len)
  data = cfg.data
  meta = precompute(
    make_source(data),
    f.out,
    encode_images=encode_images,
    encode_text=encode_text,
    resolution=data.get("resolution", 256),
    # A VAE takes RGB; pixel-space ("identity") data keeps the config's channels.
    channels=data.get("channels", 3) if f.vae == "identity" else 3,
    batch_size=f.batch_size,
    shard_size=f.shard_size,
    seed=f.seed,
    dtype=f.dtype,
    process_index=f.process_index,
    process_count=f.process_count,
    on_bad_image=data.get("on_bad_image", "skip"),
  )
  print(json.dumps(meta))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file; its `data` section is encoded.")
  flags.DEFINE_string("out", None, "Output directory for shards and meta.json.")
  flags.DEFINE_string("vae", None, "diffusers AutoencoderKL directory, or 'identity' (pixels).")
  flags.DEFINE_string("t5", None, "T5 directory, 'demo' (offline random T5), or unset: no text.")
  flags.DEFINE_integer("text_len", 120, "Tokens per caption (padded / truncated).")
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call (each call encodes 2x).")
  flags.DEFINE_integer("shard_size", 4096, "Records per shard file.")
  flags.DEFINE_integer("seed", 0, "Seed of the VAE posterior samples.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype.")
  flags.DEFINE_integer("process_index", 0, "This process (shards s = index mod count).")
  flags.DEFINE_integer("process_count", 1, "Number of precompute processes.")
  flags.mark_flags_as_required(["config", "out", "vae"])
  app.run(main)
