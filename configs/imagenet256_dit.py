"""Class-conditional DiT on ImageNet 256x256, trained on precomputed SD-VAE latents (32x32x4).

The argument picks the size, as in the DiT paper (Peebles & Xie, 2023, Table 1):

  python -m dit.info  --config=configs/imagenet256_dit.py:XL/2
  python -m dit.train --config=configs/imagenet256_dit.py:B/4 --workdir=runs/b4 \
      --config.data.path=/data/imagenet256_latents

Training hyperparameters are the paper's: AdamW, lr 1e-4 constant, no weight decay, batch 256,
EMA 0.9999, linear beta schedule with T = 1000, learned sigma, label dropout 0.1.

`lightningdit` (= `lightningdit-XL/2`; any size as `lightningdit-B/2`, ...): LightningDiT's
choices (Yao et al. 2025, hustvl/LightningDiT's released configs) on the same SD-VAE latents:

  python -m dit.info --config=configs/imagenet256_dit.py:lightningdit
"""

import ml_collections

# Size name -> (hidden_size, depth, num_heads).
MODEL_PRESETS = {
  "S": (384, 12, 6),
  "B": (768, 12, 12),
  "L": (1024, 24, 16),
  "XL": (1152, 28, 16),
}
PATCH_SIZES = (2, 4, 8)
# "XL/2", ..., "S/8": every preset of the paper.
PRESETS = tuple(f"{size}/{p}" for size in MODEL_PRESETS for p in PATCH_SIZES)
# The same sizes with LightningDiT's blocks and training; "lightningdit" is its XL/2.
LIGHTNINGDIT_PRESETS = ("lightningdit", *(f"lightningdit-{p}" for p in PRESETS))


def _lightningdit(c: ml_collections.ConfigDict) -> None:
  """LightningDiT's choices, from hustvl/LightningDiT (models/lightningdit.py, train.py and
  configs/lightningdit_xl_vavae_f16d32.yaml), on the DiT config `c` (unlocked)."""
  # Blocks: RMSNorm (learnable scale; the final layer's too), SwiGLU at 2/3 width, and RoPE on
  # top of the sin-cos table, which LightningDiT adds as well: pos_embed "both". Its QK-norm
  # (RMSNorm per head) exists but is off (use_qknorm: false) in every released config; turn it
  # on with --config.model.qk_norm=rmsnorm. No learned sigma; biases everywhere (as here).
  c.model.norm = "rmsnorm"
  c.model.mlp = "swiglu"
  c.model.pos_embed = "both"
  c.model.qk_norm = ""
  c.model.learn_sigma = False
  # Rectified flow as SiT's (LightningDiT's transport is SiT's): the linear path, a velocity
  # target, time 0 = noise and 1 = data fed unscaled to the model, with logit-normal times
  # (its use_lognorm). Its cosine loss term and its sampling-time shift and CFG interval have
  # no counterpart here; EMA 0.9999 and no grad clipping are the DiT defaults above.
  del c["diffusion"]
  c.flow = ml_collections.ConfigDict()
  c.flow.interpolant = "linear"
  c.flow.target = "velocity"
  c.flow.time_sampler = "logit_normal"
  c.flow.logit_mean = 0.0
  c.flow.logit_std = 1.0
  c.flow.weighting = "uniform"
  c.flow.shift = 1.0
  c.flow.time_scale = 1.0
  c.flow.reverse_time = True
  c.flow.eps = 0.0
  # AdamW at lr 2e-4, beta2 0.95, batch 1024 (its large-batch recipe).
  c.batch_size = 1024
  c.optim.lr = 2e-4
  c.optim.b2 = 0.95
  # Its ODE sampler: Euler, 250 steps.
  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "euler"
  c.sample.steps = 250
  c.sample.spacing = "uniform"
  c.sample.cfg_scale = 1.5
  c.sample.num = 64
  c.sample.use_ema = True


def get_config(arg: str = "XL/2") -> ml_collections.ConfigDict:
  if arg not in PRESETS + LIGHTNINGDIT_PRESETS:
    raise ValueError(
      f"Unknown DiT preset {arg!r}; expected one of {PRESETS}, or 'lightningdit' or "
      f"'lightningdit-SIZE/P' such as 'lightningdit-B/2'"
    )
  lightningdit = arg.startswith("lightningdit")
  if lightningdit:
    arg = arg.removeprefix("lightningdit").removeprefix("-") or "XL/2"
  size, patch = arg.split("/")
  hidden, depth, heads = MODEL_PRESETS[size]

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 400_000
  c.batch_size = 256  # Global batch, split over all devices.
  c.grad_accum_steps = 1
  c.parallelism = "pmap"  # "pmap" | "mesh".
  # Mesh axis sizes (one may be -1: all remaining devices); arrays under fsdp_min_size
  # elements are not FSDP-sharded.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, fsdp_min_size=2**14))
  # "" or a jax.checkpoint_policies name ("nothing_saveable", "dots_saveable", ...): remat
  # of the whole forward per (micro-)batch; per-block remat is config.model.remat.
  c.step_remat_policy = ""
  c.distributed = False

  c.log_every = 100
  c.ckpt_every = 10_000
  c.keep_ckpts = 3
  c.sample_every = 50_000
  c.max_bad_steps = 20
  c.progress_bar = True

  # Precomputed latents of the SD VAE (ft-EMA), scale 0.18215 applied: 32x32x4 per image.
  c.data = ml_collections.ConfigDict()
  c.data.name = "precomputed"
  c.data.path = ""  # Set with --config.data.path=...
  c.data.resolution = 32
  c.data.channels = 4
  c.data.num_classes = 1000
  c.data.random_flip = False  # Flips are baked into precomputed latents if wanted.

  c.model = ml_collections.ConfigDict()
  c.model.input_size = 32
  c.model.patch_size = int(patch)
  c.model.in_channels = 4
  c.model.hidden_size = hidden
  c.model.depth = depth
  c.model.num_heads = heads
  c.model.mlp_ratio = 4.0
  c.model.num_classes = 1000
  c.model.class_dropout_prob = 0.1  # Label dropout, drawn by the train loop (not a DiT field).
  c.model.learn_sigma = True
  c.model.block = "adaln_zero"  # How the condition enters the blocks (dit.models.dit.BLOCKS).
  # Block options (dit.models.dit.DiT): norm "layernorm" | "rmsnorm"; mlp "gelu" | "swiglu";
  # pos_embed "sincos" | "rope" | "both"; qk_norm "" | "layernorm" | "rmsnorm".
  c.model.norm = "layernorm"
  c.model.mlp = "gelu"
  c.model.pos_embed = "sincos"
  c.model.rope_theta = 10000.0
  c.model.qk_norm = ""
  c.model.attention_impl = "xla"  # "xla" | "cudnn" (GPU, bf16) | "einsum".
  c.model.dtype = "bfloat16"  # Compute dtype; params stay float32.
  c.model.remat = False
  c.model.remat_policy = ""  # With remat: "" or a dit.models.repeat.REMAT_POLICIES name.
  c.model.scan = False  # The blocks as one lax.scan: one block compiled (same params).

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.beta_start = 1e-4
  c.diffusion.beta_end = 0.02
  c.diffusion.prediction = "eps"
  c.diffusion.weighting = "uniform"
  c.diffusion.min_snr_gamma = 5.0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 0.0
  c.optim.ema_decay = 0.9999
  c.optim.ema_warmup = False
  # "sp" (standard) | "mup": init and per-layer learning rates scaled by width (docs/mup.md).
  c.parametrization = "sp"
  c.mup = ml_collections.ConfigDict(dict(base_width=384))

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "ddim"
  c.sample.steps = 250
  c.sample.cfg_scale = 1.5
  c.sample.eta = 0.0
  c.sample.num = 64
  c.sample.use_ema = True

  # The VAE that decodes samples (grids, FID): a diffusers AutoencoderKL directory such as
  # sd-vae-ft-ema; "" leaves samples as latents.
  c.vae = ml_collections.ConfigDict()
  c.vae.path = ""

  # FID during training (eval.every > 0) and in dit.evaluate, with ADM's reference batch
  # statistics (python -m dit.fid_stats). The paper's FID-50K: --config.eval.num_samples=50000.
  c.eval = ml_collections.ConfigDict()
  c.eval.metric = "fid"
  c.eval.every = 0
  c.eval.num_samples = 10_000
  c.eval.batch_size = 250
  c.eval.best_metric = "fid"
  c.eval.best_mode = "min"
  c.eval.inception_path = ""  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth.
  c.eval.ref_stats = ""  # .npz with mu/sigma (ADM's VIRTUAL_imagenet256_labeled.npz works).
  c.eval.dinov2_path = ""  # For "fd_dinov2": a Hugging Face DINOv2 directory (ViT-L/14).
  c.eval.dinov2_ref_stats = ""  # For "fd_dinov2": dit.fid_stats --feature=dinov2 output.

  if lightningdit:
    _lightningdit(c)
  c.lock()
  return c
