"""The digits demo trained with flow matching (rectified flow, as SiT / SD3) instead of eps.

Same model, data, optimizer and step budget as configs/digits.py; the diffusion section is
replaced by a flow section: the linear path x_t = (1 - t) x0 + t eps with a velocity target
and logit-normal times (SD3), sampled with a few-step ODE solver.

  python -m dit.train    --config=configs/digits_flow.py --workdir=runs/digits_flow
  python -m dit.evaluate --workdir=runs/digits_flow --config=configs/digits_flow.py
  python -m dit.sample   --workdir=runs/digits_flow --out=flow.png --sampler=heun --steps=8

Ablations: --config.flow.time_sampler=uniform|mode|cosmap, --config.flow.interpolant=gvp|vp,
--config.flow.target=noise|x0, --config.flow.shift=3.0 (docs/flow_matching.md).
"""

import os

import ml_collections

from dit.cli import load_config


def get_config() -> ml_collections.ConfigDict:
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
  c.unlock()
  del c["diffusion"]
  c.flow = ml_collections.ConfigDict()
  c.flow.interpolant = "linear"  # "linear" | "gvp" | "vp" (dit.diffusion.flow).
  c.flow.target = "velocity"  # "velocity" | "noise" | "x0".
  c.flow.time_sampler = "logit_normal"  # "uniform" | "logit_normal" | "mode" | "cosmap".
  c.flow.logit_mean = 0.0
  c.flow.logit_std = 1.0
  c.flow.mode_scale = 1.29  # For "mode".
  c.flow.weighting = "uniform"  # "uniform" | "sigma_sqrt" | "cosmap".
  c.flow.shift = 1.0  # SD3's time shift (3.0 at 1024px); 16 tokens need none.
  c.flow.dynamic_shift = False  # Flux: the shift from the token count instead.
  c.flow.time_scale = 1000.0  # The model sees 1000 t, the range its timestep embedding expects.
  c.flow.reverse_time = False  # True for SiT checkpoints (their time runs noise -> data).
  c.flow.eps = 1e-3  # Times stay in [eps, 1 - eps] where a path or target is singular.

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "euler"  # dit.diffusion.flow_samplers.FLOW_SAMPLERS.
  c.sample.steps = 16
  c.sample.spacing = "uniform"  # "uniform" | "diffusers".
  c.sample.cfg_scale = 4.0
  c.sample.num = 100
  c.sample.use_ema = True
  c.lock()
  return c
