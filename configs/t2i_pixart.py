"""Text-to-image: a PixArt-alpha-style DiT (adaLN-single + cross-attention to T5 embeddings).

The default trains on captioned digits ("a handwritten digit seven", "the number 7", ...,
dit/data/digits.py CAPTION_TEMPLATES) in pixel space with the offline demo text encoder (byte
tokenizer + a small random T5, rebuilt from `config.text` wherever it is needed), on CPU in a
few minutes:

  python -m dit.train  --config=configs/t2i_pixart.py --workdir=runs/t2i
  python -m dit.sample --config=configs/t2i_pixart.py --workdir=runs/t2i \
      --prompt="a handwritten digit seven" --num=16 --out=seven.png

A real text-to-image run sets a T5 directory and a VAE and trains on precomputed latents:

  --config.text.t5_path=/models/t5-v1_1-xxl --config.model.caption_channels=4096
  --config.vae.path=/models/sd-vae-ft-ema --config.data.name=precomputed --config.data.path=...

Text sizes are tied: config.data.text is config.text (the input pipeline embeds the captions
with the same encoder as dit.sample), and data.max_text_length / model.caption_length follow
text.max_length.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 2000
  c.batch_size = 64
  c.grad_accum_steps = 1
  c.parallelism = "pmap"  # "pmap" | "mesh".
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.distributed = False

  c.log_every = 100
  c.ckpt_every = 500
  c.keep_ckpts = 2
  c.sample_every = 0  # Writes samples/step_XXXXXX.png (one row per prompt); 0 disables.
  c.max_bad_steps = 20
  c.progress_bar = True

  # The text encoder: "" = the offline demo encoder (see dit/data/text.py).
  c.text = ml_collections.ConfigDict()
  c.text.t5_path = ""
  c.text.max_length = 32  # Tokens per caption, EOS included.
  c.text.overflow = "warn"  # Longer prompts: "warn" (truncate) | "error" | "truncate".
  c.text.dtype = "float32"
  c.text.demo_dim = 64  # Offline demo encoder: width, layers, heads, init seed.
  c.text.demo_layers = 2
  c.text.demo_heads = 4
  c.text.demo_seed = 0

  # The VAE for latent models: "" = pixel space (dit.sample writes the model's output).
  c.vae = ml_collections.ConfigDict()
  c.vae.path = ""

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.resolution = 8
  c.data.channels = 1
  c.data.num_classes = 10
  c.data.captions = "templates"  # One of several phrasings per image.
  c.data.text = c.text  # Captions are embedded on the fly with this encoder (shared).
  c.data.max_text_length = c.text.get_ref("max_length")

  c.model = ml_collections.ConfigDict()
  c.model.input_size = 8
  c.model.patch_size = 2  # 16 tokens.
  c.model.in_channels = 1
  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.model.num_classes = 0  # Text only.
  # Caption dropout, drawn by the train loop (not a DiT field): rows see the null caption.
  c.model.class_dropout_prob = 0.1
  c.model.learn_sigma = False
  c.model.block = "adaln_single"  # PixArt-alpha: shared t_block + cross-attention.
  c.model.caption_channels = c.text.get_ref("demo_dim")  # Set to the T5 width for a real T5.
  c.model.caption_length = c.text.get_ref("max_length")
  c.model.null_caption = "learned"
  c.model.dtype = "float32"
  c.model.remat = False
  c.model.remat_policy = ""  # With remat: "" or a dit.models.repeat.REMAT_POLICIES name.
  c.model.scan = False  # The blocks as one lax.scan: one block compiled (same params).

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.beta_start = 1e-4
  c.diffusion.beta_end = 0.02
  c.diffusion.prediction = "eps"
  c.diffusion.weighting = "min_snr"
  c.diffusion.min_snr_gamma = 5.0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.999
  c.optim.ema_warmup = True
  # "sp" (standard) | "mup": init and per-layer learning rates scaled by width (docs/mup.md).
  c.parametrization = "sp"
  c.mup = ml_collections.ConfigDict(dict(base_width=128))

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "ddim"
  c.sample.steps = 50
  c.sample.cfg_scale = 4.0
  c.sample.eta = 0.0
  c.sample.num = 100  # The grid: one row per prompt.
  c.sample.use_ema = True
  # Prompts of the grid written during training and by dit.sample without --prompt;
  # "{name}" / "{digit}" are filled with each digit 0..9 in turn (one row each).
  c.sample.prompt_template = "a handwritten digit {name}"

  c.eval = ml_collections.ConfigDict()
  c.eval.metric = "digits"
  c.eval.every = 0
  c.eval.num_samples = 1000
  c.eval.batch_size = 500
  c.eval.best_metric = "accuracy"
  c.eval.best_mode = "max"
  c.eval.inception_path = ""
  c.eval.ref_stats = ""
  c.eval.dinov2_path = ""  # For "fd_dinov2": a Hugging Face DINOv2 directory (ViT-L/14).
  c.eval.dinov2_ref_stats = ""  # For "fd_dinov2": dit.fid_stats --feature=dinov2 output.
  return c
