"""The digits demo with REPA: the hidden state after block 2 aligned with a digits encoder.

DINOv2 means nothing on 8x8 digits, so a small ViT of DINOv2's architecture, trained on the
digits' training split by experiments/digits_encoder.py and saved in DINOv2's Hugging Face
format, stands in for it (its 4 x 4 patch grid is the DiT's). Everything else is
configs/digits.py (or configs/digits_flow.py with the argument `flow`); model.repa_block=0
turns REPA off and leaves the same run.

  python -m experiments.digits_encoder --out=runs/digits_encoder
  python -m dit.train --config=configs/digits_repa.py --workdir=runs/digits_repa
  python -m dit.train --config=configs/digits_repa.py:flow --workdir=runs/digits_repa_flow

A real DINOv2 (e.g. facebook/dinov2-base, 768 wide, patch 14) on RGB data:
--config.repa.encoder_path=DIR --config.model.repa_dim=768 --config.repa.resolution=224.
"""

import os

import ml_collections

from dit.cli import load_config

BASES = {"": "digits.py", "flow": "digits_flow.py"}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in BASES:
    raise ValueError(f"Unknown digits_repa variant {arg!r}; expected one of {sorted(BASES)}")
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), BASES[arg]))
  c.unlock()
  # The projector (a DiT submodule, trained and saved with it; sampling skips it).
  c.model.repa_block = 2  # Align the tokens after this block (1-based; 0 turns REPA off).
  c.model.repa_hidden = 512  # Projector MLP width (REPA: 2048 for D = 1152).
  c.model.repa_dim = 64  # The encoder's feature width.

  c.repa = ml_collections.ConfigDict()
  c.repa.weight = 0.5  # lambda: loss = denoising loss + weight * (- mean cosine similarity).
  c.repa.encoder = "dinov2"  # The encoder's architecture (Hugging Face DINOv2 layout).
  c.repa.encoder_path = "runs/digits_encoder"  # Its directory (config.json + safetensors).
  c.repa.resolution = 0  # The encoder's input size; 0: the images as they are (8 x 8).
  # "encoder": run it in the train step on the images; "precomputed": batch["repa"] from
  # `dit.data.precompute --repa_encoder` (config.data.name = "precomputed").
  c.repa.source = "encoder"
  c.lock()
  return c
