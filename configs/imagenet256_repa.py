"""SiT + REPA on ImageNet 256x256 latents (Yu et al. 2024): SiT-XL/2's recipe with the tokens
after block 8 aligned with DINOv2-B/14's patch features (lambda 0.5, projector width 2048).

The encoder sees the pixels, which latent training does not have in the step, so its features
are precomputed with the latents (224 x 224 input: a 16 x 16 grid, the DiT's at 256 / 8 / 2):

  python -m dit.data.precompute --config=configs/imagenet256_dit.py --out=/data/in256 \
      --config.data.name=folder --config.data.path=/data/imagenet/train \
      --config.data.resolution=256 --vae=/models/sd-vae-ft-ema \
      --repa_encoder=/models/dinov2-base --repa_resolution=224
  python -m dit.train --config=configs/imagenet256_repa.py:XL/2 --workdir=runs/sit_xl_repa \
      --config.data.path=/data/in256

The argument picks the size as in configs/imagenet256_sit.py; REPA's paper aligns block 8 of
SiT-XL's 28 (block 4 of B's and S's 12) and uses DINOv2-B (768 wide) for every size.
"""

import os

import ml_collections

from dit.cli import load_config

BLOCK = {"S": 4, "B": 4, "L": 8, "XL": 8}


def get_config(arg: str = "XL/2") -> ml_collections.ConfigDict:
  here = os.path.dirname(os.path.abspath(__file__))
  c = load_config(os.path.join(here, f"imagenet256_sit.py:{arg}"))
  c.unlock()
  c.model.repa_block = BLOCK[arg.split("/")[0]]
  c.model.repa_hidden = 2048
  c.model.repa_dim = 768  # DINOv2-B/14.
  c.repa = ml_collections.ConfigDict()
  c.repa.weight = 0.5
  c.repa.encoder = "dinov2"
  c.repa.encoder_path = ""  # Only with source="encoder" (pixel-space data).
  c.repa.resolution = 224
  c.repa.source = "precomputed"
  c.lock()
  return c
