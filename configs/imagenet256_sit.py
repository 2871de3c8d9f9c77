"""SiT (Ma et al. 2024): DiT's model on ImageNet 256x256 latents, trained with flow matching.

The argument picks the size as in configs/imagenet256_dit.py (S/B/L/XL x patch 2/4/8). The
flow settings are SiT's: the linear path with a velocity target, uniform times, and time fed
to the model as SiT counts it (reverse_time: 0 = noise, 1 = data, unscaled), so SiT's
official checkpoints (DiT's layout, learn_sigma=True with the variance half unused) load
with `python -m dit.models.convert --kind=sit` and sample with SiT's SDE sampler defaults:

  python -m dit.models.convert --kind=sit --source=SiT-XL-2-256x256.pt --workdir=runs/sit_xl \
      --vae=/models/sd-vae-ft-ema
  python -m dit.sample --workdir=runs/sit_xl --labels=207,360 --num=8 --cfg_scale=4.0
"""

import os

import ml_collections

from dit.cli import load_config


def get_config(arg: str = "XL/2") -> ml_collections.ConfigDict:
  here = os.path.dirname(os.path.abspath(__file__))
  c = load_config(os.path.join(here, f"imagenet256_dit.py:{arg}"))
  c.unlock()
  del c["diffusion"]
  c.flow = ml_collections.ConfigDict()
  c.flow.interpolant = "linear"
  c.flow.target = "velocity"
  c.flow.time_sampler = "uniform"
  c.flow.weighting = "uniform"
  c.flow.shift = 1.0
  c.flow.time_scale = 1.0  # SiT's timestep embedder sees t in [0, 1].
  c.flow.reverse_time = True
  c.flow.eps = 0.0

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "euler_maruyama"  # SiT's SDE: 250 steps, diffusion "sigma", last "mean".
  c.sample.steps = 250
  c.sample.diffusion_form = "sigma"
  c.sample.last_step = "mean"
  c.sample.last_step_size = 0.04
  c.sample.cfg_scale = 1.5
  c.sample.num = 16
  c.sample.use_ema = True
  c.lock()
  return c
