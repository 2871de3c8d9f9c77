"""Text-to-image with Flux's transformer (double- then single-stream blocks, 3-axis RoPE),
trained by flow matching with Flux's dynamic time shift (dit/models/flux.py, docs/flux.md).

The default trains on captioned digits in pixel space with the offline demo text encoder
(the data and text sections are configs/t2i_pixart.py's), on CPU in a few minutes:

  python -m dit.train  --config=configs/t2i_flux.py --workdir=runs/t2i_flux
  python -m dit.sample --config=configs/t2i_flux.py --workdir=runs/t2i_flux \
      --prompt="a handwritten digit seven" --num=16 --out=seven.png

It is also the base config of converted diffusers Flux checkpoints (`python -m
dit.models.convert --kind=flux`), which replace the model fields by the checkpoint's.

Time: the model embeds its time input as given and config.flow.time_scale = 1000 makes that
1000 t, as diffusers' Flux multiplies its sigma by 1000. The 2 x 2 packing is patch_size.
"""

import os

import ml_collections

from dit.cli import load_config


def get_config() -> ml_collections.ConfigDict:
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "t2i_pixart.py"))
  c.unlock()

  c.model = ml_collections.ConfigDict()
  c.model.arch = "flux"  # dit/models/flux.py.
  c.model.input_size = 8
  c.model.patch_size = 2  # Flux's 2 x 2 packing: 16 tokens.
  c.model.in_channels = 1
  c.model.hidden_size = 128
  c.model.depth = 2  # Double-stream blocks.
  c.model.single_depth = 4  # Single-stream blocks.
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.model.axes_dim = (8, 12, 12)  # RoPE widths of the (0, row, col) ids; sum = head dim 32.
  c.model.rope_theta = 10000.0
  c.model.caption_channels = c.text.get_ref("demo_dim")  # Set to the T5 width for a real T5.
  c.model.caption_length = c.text.get_ref("max_length")
  c.model.pooled_channels = 0  # No CLIP: the pooled vector is the masked mean of the caption.
  c.model.null_caption = "learned"
  c.model.guidance_embedding = False  # Classifier-free guidance ([dev]'s is distilled).
  c.model.num_classes = 0  # Text only.
  c.model.learn_sigma = False
  # Caption dropout, drawn by the train loop (not a Flux field): rows see the null caption.
  c.model.class_dropout_prob = 0.1
  c.model.attention_impl = "xla"
  c.model.dtype = "float32"
  c.model.remat = False
  c.model.remat_policy = ""
  c.model.scan = False

  del c["diffusion"]
  c.flow = ml_collections.ConfigDict()
  c.flow.interpolant = "linear"
  c.flow.target = "velocity"
  c.flow.time_sampler = "logit_normal"
  c.flow.logit_mean = 0.0
  c.flow.logit_std = 1.0
  c.flow.mode_scale = 1.29
  c.flow.weighting = "uniform"
  c.flow.shift = 1.0  # Unused with dynamic_shift.
  c.flow.dynamic_shift = True  # Flux: shift exp(mu), mu linear in the token count.
  c.flow.time_scale = 1000.0  # The model's time input is 1000 t (diffusers' Flux convention).
  c.flow.reverse_time = False
  c.flow.eps = 1e-3

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "euler"
  c.sample.steps = 16
  c.sample.spacing = "uniform"
  c.sample.cfg_scale = 4.0
  c.sample.num = 100  # The grid: one row per prompt.
  c.sample.use_ema = True
  c.sample.prompt_template = "a handwritten digit {name}"
  c.lock()
  return c
