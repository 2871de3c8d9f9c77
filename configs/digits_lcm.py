"""A 1-4 step digits sampler: consistency distillation (LCM) of the default digits model.

Train the teacher first (README command 1 writes it to digits_demo/), then:

  python -m dit.train    --config=configs/digits_lcm.py --workdir=digits_lcm
  python -m dit.evaluate --config=configs/digits_lcm.py --workdir=digits_lcm --config.sample.steps=1
  python -m dit.sample   --config=configs/digits_lcm.py --workdir=digits_lcm --sampler=lcm --steps=2

--config.distill.teacher_workdir=DIR picks another teacher. The settings beyond
configs/lcm.py's were tuned on digits (docs/distillation.md).
"""

import os

import ml_collections

from dit.cli import load_config


def get_config() -> ml_collections.ConfigDict:
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lcm.py:digits"))
  c.distill.teacher_workdir = "digits_demo"
  c.total_steps = 5000  # 2000 already gives 1-step accuracy 0.97, 5000 0.99 and less noise.
  c.ckpt_every = 1000
  c.sample_every = 0
  c.optim.lr = 2e-4
  c.distill.guidance_min = 2.0
  c.distill.guidance_max = 6.0
  c.sample.cfg_scale = 4.0  # The teacher's (configs/digits.py).
  return c
