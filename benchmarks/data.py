"""Input pipeline throughput of every source on 2 CPU cores -> benchmarks/results/data.json.

  python benchmarks/data.py [--quick]

Builds its own data in a temporary directory: ImageNet-like JPEGs (500x375, q=90) as an
image folder, a caption folder and a TFDS ArrayRecord dataset (all cropped to 256x256),
plus precomputed 32x32x4 latents (both flips) as written by `dit.data.precompute`.
"""

import argparse
import io
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from dit.data import make_train_iterator
from dit.data.precomputed import META, shard_name

RESULTS = os.path.join(os.path.dirname(__file__), "results", "data.json")


def jpeg_bytes(rng: np.random.Generator) -> bytes:
  # Smooth random images compress like photos (noise would be ~5x larger).
  small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def write_images(root: str, n: int, classes: int = 4) -> list[bytes]:
  rng = np.random.default_rng(0)
  blobs = [jpeg_bytes(rng) for _ in range(n)]
  for i, blob in enumerate(blobs):
    folder = os.path.join(root, "folder", f"class{i % classes}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
      f.write(blob)
    caps = os.path.join(root, "captions")
    os.makedirs(caps, exist_ok=True)
    with open(os.path.join(caps, f"{i}.jpg"), "wb") as f:
      f.write(blob)
    with open(os.path.join(caps, f"{i}.txt"), "w") as f:
      f.write(f"a photo of thing number {i}")
  return blobs


def write_tfds(data_dir: str, blobs: list[bytes]) -> None:
  import tensorflow_datasets as tfds

  class BenchJpegs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(num_classes=4)}
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, blob in enumerate(blobs):
        yield i, {"image": io.BytesIO(blob), "label": i % 4}

  BenchJpegs(data_dir=data_dir, file_format="array_record").download_and_prepare()


def write_latents(path: str, n: int, dtype: str, shard_size: int = 4096) -> None:
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  num_shards = -(-n // shard_size)
  for s in range(num_shards):
    m = min(shard_size, n - s * shard_size)
    latents = rng.standard_normal((m, 2, 32, 32, 4), np.float32).astype(dtype)
    np.save(os.path.join(path, shard_name("latent", s, num_shards)), latents)
    labels = rng.integers(0, 1000, m).astype(np.int32)
    np.save(os.path.join(path, shard_name("label", s, num_shards)), labels)
  with open(os.path.join(path, META), "w") as f:
    json.dump({"num_records": n, "shard_size": shard_size, "num_shards": num_shards}, f)


def measure(config: dict, batch: int, steps: int, warmup: int, repeats: int = 1) -> dict:
  """Steady-state examples/s: `steps` batches after `warmup` (more than the prefetch buffer,
  so batches decoded before the clock started do not count); median of `repeats` runs."""
  rates = []
  for _ in range(repeats):
    it = make_train_iterator(config, global_batch_size=batch, seed=0)
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(steps):
      out = next(it)
    rates.append(steps * batch / (time.perf_counter() - start))
    it.close()
  key = "latent" if "latent" in out else "image"
  return {
    "per_s": round(float(np.median(rates)), 1),
    "per_s_runs": [round(r, 1) for r in rates],
    "batch": batch,
    "steps": steps,
    "shape": list(out[key].shape[1:]),
    "num_threads": config.get("num_threads"),
  }


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
  args = parser.parse_args()
  if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # The 2 cores.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  quick = args.quick
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    blobs = write_images(tmp, 256)
    write_tfds(os.path.join(tmp, "tfds"), blobs)
    for dtype in ("float32", "float16"):
      write_latents(os.path.join(tmp, f"latents_{dtype}"), 20_000, dtype)
    image_sources = {
      "folder": {"name": "folder", "path": os.path.join(tmp, "folder")},
      "captions": {"name": "captions", "path": os.path.join(tmp, "captions")},
      "tfds": {"name": "tfds:bench_jpegs", "data_dir": os.path.join(tmp, "tfds")},
    }
    digits = {"name": "digits", "num_threads": 0}
    results["digits_16x16x1"] = measure(digits, 256, 10 if quick else 100, 2, 3)
    for name, config in image_sources.items():
      for threads in (2, 8):
        cfg = dict(config, resolution=256, num_threads=threads)
        key = f"{name}_jpeg500x375_to_256_threads{threads}"
        results[key] = measure(cfg, 32, 3 if quick else 40, 2 if quick else 10)
    for dtype in ("float32", "float16"):
      for threads in (0, 2):
        cfg = {"name": "precomputed", "path": os.path.join(tmp, f"latents_{dtype}")}
        cfg["num_threads"] = threads
        key = f"precomputed_32x32x4_{dtype}_threads{threads}"
        results[key] = measure(cfg, 256, 5 if quick else 40, 2 if quick else 5, 3)
  latent_rate = max(v["per_s"] for k, v in results.items() if k.startswith("precomputed"))
  report = {
    "benchmark": "input pipeline throughput (examples/s, this process = 1 host)",
    "cpu_cores": cores,
    "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # Shared machine: noise.
    "machine": platform.processor() or platform.machine(),
    "results": results,
    "precomputed_latents_per_s": latent_rate,
    "target_latents_per_s": 5000,
    "target_met": latent_rate >= 5000,
  }
  print(json.dumps(report, indent=2))
  if not args.quick:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
