"""Evaluation throughput: FID Inception features (images/s), Frechet distance, digits metric.

Random Inception weights (the speed does not depend on them). Writes JSON:
  python benchmarks/eval.py [--num_images=16 --batch_size=8 --resolution=64 --out=...]
"""

import json
import os
import platform
import time

import jax
import numpy as np
from absl import app, flags
from threadpoolctl import threadpool_limits

from dit import metrics
from dit.models import inception

flags.DEFINE_integer("num_images", 16, "Images to embed (after one warm-up batch).")
flags.DEFINE_integer("batch_size", 8, "Inception batch size.")
flags.DEFINE_integer("resolution", 64, "Input resolution (resized to 299 inside the model).")
flags.DEFINE_integer("fid_dim", 2048, "Feature dimension of the Frechet distance timing.")
flags.DEFINE_string(
  "out", os.path.join(os.path.dirname(__file__), "results", "eval.json"), "Output JSON."
)
FLAGS = flags.FLAGS


def _timed(fn, repeats=1):
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def main(argv):
  del argv
  rng = np.random.RandomState(0)
  r = FLAGS.resolution
  feature_fn = inception.make_feature_fn(inception.init_random_variables(), FLAGS.batch_size)
  images = rng.uniform(-1, 1, (FLAGS.num_images, r, r, 3)).astype(np.float32)
  compile_s = _timed(lambda: feature_fn(images[: FLAGS.batch_size]))
  inception_s = _timed(lambda: feature_fn(images))

  d = FLAGS.fid_dim
  x = rng.randn(2 * d, d)
  mu, sigma = metrics.feature_statistics(x)
  fd = lambda: metrics.frechet_distance(mu, sigma, mu + 0.1, sigma * 1.1)
  fd_s = _timed(fd)
  # OpenBLAS's threaded eigh is often slower than one thread (and much slower on a busy
  # machine), so both are recorded.
  with threadpool_limits(1):
    fd_1thread_s = _timed(fd)

  digits, _ = metrics.digits_held_out()
  digits = np.repeat(np.repeat(digits, 2, axis=1), 2, axis=2)  # 16x16 like the demo.
  fit_s = _timed(lambda: metrics.digits_classifier())
  digits_fn = metrics.digits_feature_fn()
  digits_s = _timed(lambda: digits_fn(digits), repeats=5)

  result = {
    "device": jax.devices()[0].device_kind,
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "load_average_1min_at_end": None,
    "inception_input": [r, r, 3],
    "inception_batch_size": FLAGS.batch_size,
    "inception_num_images": FLAGS.num_images,
    "inception_compile_and_first_batch_s": round(compile_s, 2),
    "inception_images_per_s": round(FLAGS.num_images / inception_s, 3),
    "frechet_distance_dim": d,
    "frechet_distance_s": round(fd_s, 3),
    "frechet_distance_1_blas_thread_s": round(fd_1thread_s, 3),
    "digits_classifier_fit_s": round(fit_s, 3),
    "digits_features_images_per_s": round(len(digits) / digits_s, 1),
  }
  # Shared CI machines: the load says how much of the CPU these timings had.
  result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
