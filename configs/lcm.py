"""Consistency distillation (LCM) of any DiT config into a 1-8 step student.

  python -m dit.train --config=configs/lcm.py:imagenet256_dit:XL/2 --workdir=runs/xl2_lcm \
      --config.distill.teacher_workdir=runs/xl2
  python -m dit.sample --workdir=runs/xl2_lcm --sampler=lcm --steps=4 --cfg_scale=4

The argument names the teacher's config file in configs/ (and its own argument after a
second colon). The student is that config with model.guidance_embedding=True, the `distill`
section below (see dit/distill.py), the LCM optimiser settings (the EMA with decay 0.95 is
the target network) and LCM sampling. configs/digits_lcm.py is the tuned digits version.
"""

import os

import ml_collections

from dit.cli import load_config


def base_config(arg: str) -> ml_collections.ConfigDict:
  """get_config([arg]) of configs/<name>.py for arg = "name[:arg]"."""
  name, _, sub = arg.partition(":")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name.removesuffix('.py')}.py")
  if not os.path.isfile(path):
    raise ValueError(f"no teacher config {path!r} (the argument is a config name in configs/)")
  return load_config(f"{path}:{sub}" if sub else path)


def make_student(
  c: ml_collections.ConfigDict, teacher_workdir: str = ""
) -> ml_collections.ConfigDict:
  """The LCM student of teacher config `c` (changed in place and returned)."""
  c.unlock()  # Base configs may come locked; the loader locks the result again.
  c.model.guidance_embedding = True
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher_workdir = teacher_workdir  # The teacher's dit.train / convert workdir.
  c.distill.teacher_use_ema = True
  c.distill.num_ddim_timesteps = 50  # Grid of the teacher's ODE steps (LCM: 50).
  c.distill.solver = "ddim"  # The teacher's ODE step: "ddim" (LCM) | "dpmpp_2s" (2nd order).
  c.distill.guidance_min = 2.0  # Guidance scale w ~ U[min, max], an input of the student.
  c.distill.guidance_max = 8.0
  c.distill.distance = "huber"  # "huber" (pseudo-Huber, LCM) | "l2".
  c.distill.huber_c = 0.001
  c.distill.timestep_scaling = 10.0  # c_skip / c_out of timestep * scaling (LCM).

  c.optim.ema_decay = 0.95  # The target network theta- (LCM's mu).
  c.optim.ema_warmup = False
  c.optim.schedule = "constant"
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.sample.sampler = "lcm"
  c.sample.steps = 4
  c.sample.eta = 0.0
  return c


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
  return make_student(base_config(arg))
