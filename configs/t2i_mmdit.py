"""Text-to-image on Stable Diffusion 3's MMDiT (joint image-text attention, dit/models/mmdit.py).

The same task as configs/t2i_pixart.py: captioned digits in pixel space with the offline demo
text encoder (T5-only, so the pooled text vector is the caption's masked mean; docs/mmdit.md).
Trains with the eps objective by default, or with flow matching (SD3's rectified flow) with
the ":flow" argument:

  python -m dit.train  --config=configs/t2i_mmdit.py --workdir=runs/t2i_mmdit
  python -m dit.train  --config=configs/t2i_mmdit.py:flow --workdir=runs/t2i_mmdit_flow
  python -m dit.sample --config=configs/t2i_mmdit.py --workdir=runs/t2i_mmdit \
      --prompt="a handwritten digit seven" --num=16 --out=seven.png

":sd3" is flow matching with SD3's shift 3 and sampler settings: the base of converted SD3
checkpoints (python -m dit.models.convert --kind=sd3, docs/mmdit.md).

Text sizes are tied as in configs/t2i_pixart.py: config.data.text is config.text, and
data.max_text_length / model.caption_length follow text.max_length.
"""

import os

import ml_collections

from dit.cli import load_config

VARIANTS = ("", "flow", "sd3")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"configs/t2i_mmdit.py takes one of {VARIANTS[1:]} or nothing, got {arg!r}")
  here = os.path.dirname(os.path.abspath(__file__))
  c = load_config(os.path.join(here, "t2i_pixart.py"))
  c.unlock()

  c.model = ml_collections.ConfigDict()
  c.model.arch = "mmdit"
  c.model.input_size = 8
  c.model.patch_size = 2  # 16 image tokens + 32 text tokens in every joint attention.
  c.model.in_channels = 1
  c.model.hidden_size = 128
  c.model.depth = 4  # The last block is context-pre-only.
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.model.num_classes = 0  # Text only.
  # Caption dropout, drawn by the train loop (not an MMDiT field): rows see the null caption.
  c.model.class_dropout_prob = 0.1
  c.model.learn_sigma = False
  c.model.caption_channels = c.text.get_ref("demo_dim")  # Set to the T5 width for a real T5.
  c.model.caption_length = c.text.get_ref("max_length")
  c.model.pooled_channels = 0  # 0: the pooled vector is the caption's masked mean (T5 only).
  c.model.null_caption = "learned"  # | "zeros" (SD3's).
  c.model.attend_padding = False  # True: SD3's attention over the padding tokens too.
  c.model.pos_embed_max_size = 0  # SD3's cropped table side (in patches); 0 = the image grid.
  c.model.pe_interpolation = 1.0
  c.model.qk_norm = "rms_norm"  # SD3.5's; "" | "rms_norm" | "layer_norm".
  c.model.attention_impl = "xla"
  c.model.dtype = "float32"
  c.model.remat = False
  c.model.remat_policy = ""  # With remat: "" or a dit.models.repeat.REMAT_POLICIES name.
  c.model.scan = False  # The blocks as one lax.scan: one block compiled (same params).
  c.model.guidance_embedding = False

  if arg in ("flow", "sd3"):
    del c["diffusion"]
    c.flow = ml_collections.ConfigDict()
    c.flow.interpolant = "linear"  # Rectified flow, as SD3: x_t = (1 - t) x0 + t eps.
    c.flow.target = "velocity"
    c.flow.time_sampler = "logit_normal"  # SD3's.
    c.flow.logit_mean = 0.0
    c.flow.logit_std = 1.0
    c.flow.mode_scale = 1.29
    c.flow.weighting = "uniform"
    c.flow.shift = 3.0 if arg == "sd3" else 1.0  # SD3's at 1024 px; 16 tokens need none.
    c.flow.dynamic_shift = False
    c.flow.time_scale = 1000.0  # The model sees 1000 t, as SD3's transformer.
    c.flow.reverse_time = False
    c.flow.eps = 1e-3

    template = c.sample.prompt_template
    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "euler"  # dit.diffusion.flow_samplers.FLOW_SAMPLERS.
    c.sample.steps = 28 if arg == "sd3" else 16
    c.sample.spacing = "uniform"
    c.sample.cfg_scale = 7.0 if arg == "sd3" else 4.0
    c.sample.num = 100
    c.sample.use_ema = True
    c.sample.prompt_template = template
  c.lock()
  return c
