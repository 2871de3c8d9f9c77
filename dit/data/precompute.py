"""Encode a dataset once (VAE latents of both flips, T5 embeddings, REPA features): the writer.

  python -m dit.data.precompute --config=configs/imagenet256_dit.py --out=DIR \
      [--vae=DIR] [--t5=DIR] [--repa_encoder=DIR [--repa_resolution=224]] \
      [--batch_size=64] [--shard_size=4096] [--dtype=float16]

Output (fast-DiT style, one sample of the VAE posterior per image and flip): meta.json and
.npy shards of latents (both flips), labels, optional text embeddings and optional DINOv2
patch features of both flips (REPA's targets), in the layout of dit/data/precomputed.py,
whose `PrecomputedSource(DIR)` reads them back through memory maps (the fast training path,
`config.data.name = "precomputed"`). Process p of P writes shards s = p (mod P); finished
shards are skipped, so a killed run resumes where it stopped (with the same REPA encoder).
"""

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from dit.data.pipeline import Loader, make_source
from dit.data.precomputed import FIELDS, META, PrecomputedSource, shard_name

__all__ = [
  "FIELDS",
  "META",
  "PrecomputedSource",
  "RepaEncoder",
  "load_encoders",
  "load_repa_encoder",
  "precompute",
  "shard_name",
]

# The format names live in dit.data.precomputed; they stay importable from here too.

EncodeImages = Callable[[np.ndarray, Any], np.ndarray]  # (B,H,W,3) [-1,1], key -> (B,h,w,c)
EncodeText = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # -> (B,L,D), (B,L)


class _RepaError(ValueError):
  """REPA features that the data or the output directory rule out (one line on the CLI)."""


@dataclasses.dataclass(frozen=True, eq=False)
class RepaEncoder:
  """A frozen DINOv2's patch features (REPA's targets); `load_repa_encoder` builds it.

  Called on images (B, H, W, C) float in [-1, 1] (C = the encoder's num_channels, or 1 for an
  RGB encoder: grey repeated), returns (B, Np, D) float32:
  `dinov2.repa_features(config, resolution or None)`, jitted once (the train step's features
  with repa.source="encoder").
  """

  path: str  # The Hugging Face DINOv2 directory, absolute.
  resolution: int  # Encoder input size; 0: the images' own size (no resize).
  config: Any  # dit.models.dinov2.Dinov2Config
  params: Any
  features: Callable[[Any, Any], Any]  # jitted (params, images) -> (B, Np, D)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(self.features(self.params, jnp.asarray(images, jnp.float32)), np.float32)

  def record(self, image_size: int, channels: int) -> dict:
    """meta.json's "repa" for (image_size, image_size, channels) images: {"encoder",
    "resolution" (the size the encoder sees), "tokens" Np, "dim" D}; ValueError naming the
    encoder if it cannot take such images. Traces only (no encoding)."""
    c = self.config
    # preprocess repeats grey to RGB; any other mismatch reaches the patch conv.
    if channels != c.num_channels and (channels, c.num_channels) != (1, 3):
      raise _RepaError(
        f"REPA encoder {self.path!r} takes {c.num_channels}-channel images, the data has "
        f"{channels} channels; expected the same, or grey data (1) with an RGB encoder (3)"
      )
    size = self.resolution or image_size
    if not self.resolution and image_size % c.patch_size:
      raise _RepaError(
        f"REPA encoder {self.path!r} has patch size {c.patch_size}, which does not divide the "
        f"data resolution {image_size}; set --repa_resolution to a multiple of {c.patch_size}"
      )
    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    try:
      out = jax.eval_shape(self.features, self.params, images)
    except (ValueError, TypeError) as e:
      raise _RepaError(
        f"REPA encoder {self.path!r} cannot take {image_size}x{image_size}x{channels} images: {e}"
      ) from e
    return {"encoder": self.path, "resolution": size, "tokens": out.shape[1], "dim": out.shape[2]}


def load_repa_encoder(path: str, resolution: int = 0) -> RepaEncoder:
  """The DINOv2 of Hugging Face directory `path` as a RepaEncoder (see there).

  resolution: encoder input size, a positive multiple of its patch size; 0: no resize.
  Raises (FileNotFoundError / ValueError) on a missing or invalid directory or resolution,
  before anything is encoded.
  """
  from dit.models import dinov2

  if resolution < 0:
    raise ValueError(f"REPA resolution must be >= 0 (0: the data resolution), got {resolution}")
  config, params = dinov2.load_dinov2(path)
  patch = jax.jit(dinov2.repa_features(config, resolution or None))
  return RepaEncoder(os.path.abspath(path), resolution, config, params, patch)


def _check_repa_resume(out_dir: str, num_shards: int, repa: dict | None) -> None:
  """ValueError if `out_dir` already holds data of other REPA features than `repa`
  (meta.json's "repa", or, before a first run finished, the finished shards')."""
  meta_path = os.path.join(out_dir, META)
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      old = json.load(f).get("repa")
    if old != repa:
      raise _RepaError(
        f"{out_dir!r} holds REPA features {old} (meta.json), this run asks for {repa}; resume "
        "with the same --repa_encoder and --repa_resolution, or write to a new --out"
      )
    return
  done = [
    s
    for s in range(num_shards)
    if os.path.exists(os.path.join(out_dir, shard_name("label", s, num_shards)))
  ]
  if not done:
    return
  name = os.path.join(out_dir, shard_name("repa", done[0], num_shards))
  old = list(np.load(name, mmap_mode="r").shape[2:]) if os.path.exists(name) else None
  new = None if repa is None else [repa["tokens"], repa["dim"]]
  if old != new:
    raise _RepaError(
      f"{out_dir!r} holds finished shards with REPA features of shape (tokens, dim) {old}, "
      f"this run asks for {new}; resume with the same --repa_encoder and --repa_resolution, "
      "or write to a new --out"
    )


def _save_atomic(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)  # A killed run never leaves a half-written shard.


def _encode_batch(
  records: list[dict],
  key: Any,
  encode_images: EncodeImages,
  encode_text: EncodeText | None,
  encode_repa: RepaEncoder | None = None,
) -> dict[str, np.ndarray]:
  """{"latent": (B, 2, h, w, c) [unflipped, flipped], "label"[, "text", "text_mask"]
  [, "repa": (B, 2, Np, D) [unflipped, flipped]]}."""
  images = np.stack([r["image"] for r in records]).astype(np.float32)
  both = np.concatenate([images, images[:, :, ::-1]])
  latents = np.asarray(encode_images(both, key), np.float32)
  b = len(records)
  out = {
    "latent": np.stack([latents[:b], latents[b:]], axis=1),
    "label": np.asarray([r["label"] for r in records], np.int32),
  }
  if encode_text is not None and "caption" in records[0]:
    emb, mask = encode_text([r["caption"] for r in records])
    out["text"], out["text_mask"] = np.asarray(emb, np.float32), np.asarray(mask)
  if encode_repa is not None:
    feats = encode_repa(both)
    out["repa"] = np.stack([feats[:b], feats[b:]], axis=1)
  return out


def _encode_shard(loader, records: range, batch_size: int, key, encoders, store, bar) -> dict:
  """{field: [arrays of each batch]} of the records of one shard, in batches."""
  outs = {f: [] for f in FIELDS}
  for start in range(records.start, records.stop, batch_size):
    batch = [loader(i) for i in range(start, min(start + batch_size, records.stop))]
    batch_key = jax.random.fold_in(key, start)
    for field, array in _encode_batch(batch, batch_key, *encoders).items():
      outs[field].append(array.astype(store if field in ("latent", "text", "repa") else np.int32))
    bar.update(len(batch))
  return outs


def precompute(
  source: Any,
  out_dir: str,
  *,
  encode_images: EncodeImages,
  encode_text: EncodeText | None = None,
  encode_repa: RepaEncoder | None = None,
  resolution: int = 256,
  channels: int = 3,
  batch_size: int = 64,
  shard_size: int = 4096,
  seed: int = 0,
  dtype: str = "float32",
  process_index: int = 0,
  process_count: int = 1,
  on_bad_image: str = "raise",
  progress: bool = False,
) -> dict:
  """Encodes `source` into .npy shards under `out_dir`; returns the metadata dict.

  Args:
    source: random-access source (see dit.data.pipeline.make_source).
    encode_images: (B, R, R, C) float32 in [-1, 1], jax key -> (B, h, w, c) scaled latents.
      Called once per batch on [images; flipped images] (2B rows).
    encode_text: list of B captions -> (embeddings (B, L, D), mask (B, L)); used when
      records have a "caption".
    encode_repa: `load_repa_encoder(...)`: also store "repa", its patch features of both
      flips (meta.json's "repa" records encoder, resolution and shape); checked on
      (resolution, channels) images, and against what `out_dir` already holds, before
      anything is encoded.
    seed: the posterior-sample key of the batch starting at record i is
      fold_in(key(seed), i): the output depends on (seed, batch_size), not on process_count.
    dtype: storage dtype of latents, text embeddings and REPA features ("float32" or
      "float16").
    progress: a tqdm bar (images, rate, ETA) over this process's shards; finished shards
      count as done, so a resumed run's ETA covers what is left.
  """
  if dtype not in ("float32", "float16"):
    raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
  if shard_size <= 0 or batch_size <= 0:
    raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be positive")
  store = np.dtype(dtype)
  n = len(source)
  if n == 0:
    raise ValueError(f"data source {source!r} is empty")
  num_shards = -(-n // shard_size)
  repa = None if encode_repa is None else encode_repa.record(resolution, channels)
  _check_repa_resume(out_dir, num_shards, repa)
  loader = Loader(
    source, resolution=resolution, channels=channels, random_flip=False, on_bad_image=on_bad_image
  )
  os.makedirs(out_dir, exist_ok=True)
  key = jax.random.key(seed)
  mine = range(process_index, num_shards, process_count)
  path = lambda field, shard: os.path.join(out_dir, shard_name(field, shard, num_shards))
  todo = [s for s in mine if not os.path.exists(path("label", s))]  # label is saved last.
  size = lambda shard: min((shard + 1) * shard_size, n) - shard * shard_size
  total, left = sum(size(s) for s in mine), sum(size(s) for s in todo)
  bar = tqdm(total=total, initial=total - left, desc="precompute", unit="img", disable=not progress)
  for shard in todo:
    lo, hi = shard * shard_size, shard * shard_size + size(shard)
    encoders = (encode_images, encode_text, encode_repa)
    outs = _encode_shard(loader, range(lo, hi), batch_size, key, encoders, store, bar)
    for field in ("latent", "text", "text_mask", "repa", "label"):
      if outs[field]:
        _save_atomic(path(field, shard), np.concatenate(outs[field]))
    logging.info("precompute: wrote shard %d of %d (records %d..%d)", shard, num_shards, lo, hi)
  bar.close()
  meta = _shard_meta(out_dir, n, shard_size, num_shards, str(store), resolution, repa)
  if process_index == 0:
    with open(os.path.join(out_dir, META), "w") as f:
      json.dump(meta, f, indent=2)
  return meta


def _shard_meta(out_dir, n, shard_size, num_shards, dtype, resolution, repa) -> dict:
  """meta.json's content, its shapes read from the shards on disk, so that a resumed run
  (or one with nothing left to do) records them too."""
  shapes = {}
  for field in FIELDS:
    names = [os.path.join(out_dir, shard_name(field, s, num_shards)) for s in range(num_shards)]
    done = [name for name in names if os.path.exists(name)]
    if done:
      shapes[field] = list(np.load(done[0], mmap_mode="r").shape[1:])
  meta = {
    "num_records": n,
    "shard_size": shard_size,
    "num_shards": num_shards,
    "dtype": dtype,
    "resolution": resolution,
    "fields": sorted(shapes) or None,
    "shapes": shapes,
  }
  if repa is not None:
    meta["repa"] = repa
  return meta


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
  from dit.cli import UserError

  del argv
  f = flags.FLAGS
  cfg = f.config
  if f.repa_resolution and not f.repa_encoder:
    raise UserError(f"--repa_resolution={f.repa_resolution} needs --repa_encoder=DIR")
  encode_repa = None
  if f.repa_encoder:
    # First, so that a bad encoder directory or resolution is reported before the VAE loads.
    try:
      encode_repa = load_repa_encoder(f.repa_encoder, f.repa_resolution)
    except (FileNotFoundError, ValueError) as e:
      raise UserError(f"--repa_encoder={f.repa_encoder}: {' '.join(str(e).split())}") from e
  encode_images, encode_text = load_encoders(f.vae, f.t5, f.text_len)
  data = cfg.data
  try:
    meta = precompute(
      make_source(data),
      f.out,
      encode_images=encode_images,
      encode_text=encode_text,
      encode_repa=encode_repa,
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
      progress=f.progress,
    )
  except _RepaError as e:  # Raised before anything is encoded.
    raise UserError(str(e)) from e
  print(json.dumps(meta))


def cli() -> None:
  """The command: flags, then `main` with one-line errors (dit.cli.run_command)."""
  from dit.cli import run_command

  config_flags.DEFINE_config_file("config", None, "Config file; its `data` section is encoded.")
  flags.DEFINE_string("out", None, "Output directory for shards and meta.json.")
  flags.DEFINE_string("vae", None, "diffusers AutoencoderKL directory, or 'identity' (pixels).")
  flags.DEFINE_string("t5", None, "T5 directory, 'demo' (offline random T5), or unset: no text.")
  flags.DEFINE_integer("text_len", 120, "Tokens per caption (padded / truncated).")
  flags.DEFINE_string(
    "repa_encoder", None, "Hugging Face DINOv2 directory: also store its patch features (REPA)."
  )
  flags.DEFINE_integer(
    "repa_resolution", 0, "DINOv2 input size, a multiple of its patch; 0: the data resolution."
  )
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call (each call encodes 2x).")
  flags.DEFINE_integer("shard_size", 4096, "Records per shard file.")
  flags.DEFINE_integer("seed", 0, "Seed of the VAE posterior samples.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype.")
  flags.DEFINE_integer("process_index", 0, "This process (shards s = index mod count).")
  flags.DEFINE_integer("process_count", 1, "Number of precompute processes.")
  flags.DEFINE_bool("progress", True, "A tqdm bar with ETA (--progress=false for logs).")
  flags.mark_flags_as_required(["config", "out", "vae"])
  run_command(main)


if __name__ == "__main__":
  cli()
