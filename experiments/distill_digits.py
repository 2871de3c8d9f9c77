"""Few-step digits: a teacher at 1/2/4/50 DDIM steps against its LCM student at 1/2/4/8.

  python -m experiments.distill_digits --teacher=digits_demo --student=digits_lcm \
      --out=docs/distillation/digits [--num_samples=1000]

Trains nothing: `--teacher` is a dit.train workdir (README command 1) and `--student` the
workdir of `dit.train --config=configs/digits_lcm.py`. Each arm's samples (same seed, the
configs' guidance scale) are scored with dit.evaluate's digits metrics (conditional accuracy
of a digits classifier, and digits_fd, a Frechet distance in its feature space) and with
edge_noise, the pixel std of the two edge columns, which are blank in most real digits (few
sampling steps leave noise there that the classifier barely sees). Sampling is timed on one
warm batch. Writes <out>.json, <out>.md and <out>.png: the sample
grids side by side (teacher 50 steps, student 1/2/4 steps; one row per class, same noise).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from dit import checkpoint, evaluation, generate

# (who, sampler, steps); the grid shows GRID_ARMS.
ARMS = [
  ("teacher", "ddim", 50),
  ("teacher", "ddim", 4),
  ("teacher", "ddim", 2),
  ("teacher", "ddim", 1),
  ("student", "lcm", 8),
  ("student", "lcm", 4),
  ("student", "lcm", 2),
  ("student", "lcm", 1),
]
GRID_ARMS = [
  ("teacher", "ddim", 50),
  ("student", "lcm", 1),
  ("student", "lcm", 2),
  ("student", "lcm", 4),
]


def edge_noise(images) -> float:
  """Std of the first and last pixel columns of (N, 8, 8, 1) images in [-1, 1]."""
  x = np.asarray(images)[..., 0]
  return float(np.concatenate([x[:, :, 0], x[:, :, -1]], axis=1).std())


def real_edge_noise() -> float:
  from dit.data import digits

  return edge_noise(digits.load_digits_arrays(8)[0])


def seconds_per_batch(config, model, params, key, num: int) -> float:
  """Wall time of one warm, jitted sampling call for `num` class-balanced images."""
  cond = generate.label_cond(config, generate.grid_labels(num, 10))
  run = lambda: jax.block_until_ready(generate.generate(config, model, params, cond, key, num))
  run()
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def evaluate_arms(teacher: str, student: str, num_samples: int, seed: int):
  """One row per arm of ARMS, and the class grids of GRID_ARMS."""
  rows, grids = [], {}
  for who in ("teacher", "student"):
    workdir = teacher if who == "teacher" else student
    config = checkpoint.read_config(workdir)
    config.eval.num_samples = num_samples
    config.eval.batch_size = min(500, num_samples)
    model, params = generate.load_params(config, workdir)
    for arm in [a for a in ARMS if a[0] == who]:
      _, sampler, steps = arm
      config.sample.sampler, config.sample.steps = sampler, steps
      key = jax.random.PRNGKey(seed)
      images, labels = evaluation.generate_samples(
        config, model, params, key, num_samples, config.eval.batch_size
      )
      result = evaluation.digits_metrics(config, images, labels)
      batch_s = seconds_per_batch(config, model, params, key, config.eval.batch_size)
      row = {
        "model": who,
        "sampler": sampler,
        "steps": steps,
        "cfg_scale": float(config.sample.cfg_scale),
        "accuracy": float(result["accuracy"]),
        "digits_fd": float(result["digits_fd"]),
        "edge_noise": edge_noise(images),
        "ms_per_image": 1000.0 * batch_s / config.eval.batch_size,
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
      if arm in GRID_ARMS:
        grids[arm] = np.asarray(generate.class_grid(config, model, params, None, key, num=100))
  return rows, grids


def write_markdown(rows: list[dict], path: str, num_samples: int) -> None:
  lines = [
    "| model | sampler | steps | accuracy | digits_fd | edge_noise | ms / image |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['accuracy']:.3f} | "
      f"{r['digits_fd']:.1f} | {r['edge_noise']:.3f} | {r['ms_per_image']:.2f} |"
    )
  lines.append("")
  lines.append(
    f"{num_samples} class-balanced samples per row, guidance scale {rows[0]['cfg_scale']:g}, "
    f"edge_noise of the real digits {real_edge_noise():.3f}, "
    "same seed; the teacher's DDIM makes one guided (2-batch) call per step, the student one "
    "plain call."
  )
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_figure(grids: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(GRID_ARMS), figsize=(4 * len(GRID_ARMS), 4.4))
  for ax, arm in zip(axes, GRID_ARMS, strict=True):
    images = generate.to_uint8(grids[arm])[..., 0]  # (100, 8, 8)
    n, h, w = images.shape
    tile = images.reshape(10, n // 10, h, w).transpose(0, 2, 1, 3).reshape(10 * h, n // 10 * w)
    ax.imshow(tile, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    who, sampler, steps = arm
    ax.set_title(f"{who}, {sampler.upper()} {steps} step{'s' if steps > 1 else ''}")
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


# ---- Command line ------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags, defined only when run as a command (the module imports cleanly)."""
  flags.DEFINE_string("teacher", "digits_demo", "The teacher's training workdir.")
  flags.DEFINE_string("student", "digits_lcm", "The LCM student's training workdir.")
  flags.DEFINE_string("out", "docs/distillation/digits", "Output prefix (.json, .md, .png).")
  flags.DEFINE_integer("num_samples", 1000, "Samples per arm.")
  flags.DEFINE_integer("seed", 0, "PRNG seed (the same for every arm).")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  rows, grids = evaluate_arms(FLAGS.teacher, FLAGS.student, FLAGS.num_samples, FLAGS.seed)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  result = {
    "teacher": os.path.abspath(FLAGS.teacher),
    "student": os.path.abspath(FLAGS.student),
    "num_samples": FLAGS.num_samples,
    "seed": FLAGS.seed,
    "device": jax.devices()[0].device_kind,
    "real_edge_noise": real_edge_noise(),
    "rows": rows,
  }
  with open(FLAGS.out + ".json", "w") as f:
    json.dump(result, f, indent=2)
  write_markdown(rows, FLAGS.out + ".md", FLAGS.num_samples)
  write_figure(grids, FLAGS.out + ".png")
  print(f"wrote {FLAGS.out}.json, .md, .png")


if __name__ == "__main__":
  define_flags()
  app.run(main)
