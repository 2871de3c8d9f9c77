"""Input pipelines: embedded digits, TFDS, image folders, precomputed latents.

Modules: sources (digits.py, tfds.py, folders.py, precomputed.py: the on-disk latent format
and its reader), preprocess.py (decode, resize, flip), text.py (caption embedding),
pipeline.py (make_source, Loader, make_train_iterator) and precompute.py (the writer of
precomputed datasets and its command, built on the pipeline's sources and Loader).

`make_train_iterator(config.data, global_batch_size=, seed=, process_index=, process_count=)`
reads these `config.data` fields (all optional, defaults in brackets):

  name            "digits" | "tfds:<name>[:version]" | "folder" | "captions" | "precomputed"
                  ["digits"]
  resolution      output H = W [16 for digits, else 256]
  channels        1 or 3 [1 for digits, else 3]
  random_flip     horizontal flips with p = 1/2 [False for digits, else True]
  captions        digits only: add "caption": True / "fixed" ("a handwritten digit seven") or
                  "templates" (one of digits.CAPTION_TEMPLATES per image) [False]
  text            a text-encoder config (dit/data/text.py: t5_path, max_length, demo_*): embed
                  each batch's captions on the fly into "text" / "text_mask" [None]
  max_text_length must equal text.max_length when set (train.py sizes the model by it)
  path            folder root, caption folder / JSONL manifest, or precomputed dir
  data_dir        TFDS data dir [$TFDS_DATA_DIR, then ~/tensorflow_datasets]
  split           TFDS split ["train"]
  image_key, label_key, caption_key   TFDS feature names ["image", "label", None]
  missing_caption "raise" | "skip" | "empty" for images without a caption ["raise"]
  on_bad_image    "skip" (use the next readable record, counted) | "raise" ["skip"]
  num_threads     Grain read threads [0 for digits / precomputed, else 8]
  prefetch        Grain prefetch buffer, in batches [max(4, num_threads)]
  buckets         folder / captions only: aspect-ratio buckets (dit/data/buckets.py), every
                  global batch from one bucket of about resolution**2 pixels [False]
  bucket_divisor  bucket sides are multiples of this [0: resolution / 16 rounded to the patch]
  bucket_max_ratio  the most elongated bucket, long side / short side [4.0]

Batches are dicts of NumPy arrays for this process only: "image" (B, R, R, C) float32
in [-1, 1] or "latent" (B, h, w, c) float32, "label" (B,) int32, and where the source
has them "caption" (B,) str, "text" (B, L, D) float32, "text_mask" (B, L) int32.
"""

from dit.data.digits import load_digits_arrays
from dit.data.pipeline import make_train_iterator

__all__ = ["load_digits_arrays", "make_train_iterator"]
