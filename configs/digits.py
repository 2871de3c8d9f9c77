"""The default demo: a small class-conditional DiT on scikit-learn's 8x8 digits.

The digits stay at their native 8x8x1, so with patch size 2 the DiT sees 16 tokens. Trains
on 2 CPU cores in a few minutes and reaches >= 90% conditional accuracy (eval.json); the
recipe (min-SNR weighting, lr 2e-3) was picked because the same compute at 16x16 / patch 4
with uniform weighting and lr 1e-3 reached only ~40%.

  python -m dit.train --config=configs/digits.py --workdir=runs/digits

Your own images instead (class folders, resized to 8x8 greyscale):

  python -m dit.train --config=configs/digits.py --workdir=runs/mine \
      --config.data.name=folder --config.data.path=DIR --config.model.num_classes=K

The argument `lightningdit` swaps in LightningDiT's block options (RMSNorm, SwiGLU, RoPE on top
of the sin-cos table; see configs/imagenet256_dit.py) and keeps everything else:

  python -m dit.train --config=configs/digits.py:lightningdit --workdir=runs/digits_lightningdit
"""

import ml_collections

# The variants of get_config(arg): their block options (config.model fields).
VARIANTS = {
  "": {},
  # 1,320 more params than the default's 1,272,324 (+0.10%): SwiGLU at hidden
  # int(2/3 * 512) = 341 has 42 more per block than the GELU MLP, and the RMSNorms' scales
  # add 2 x 128 per block and 128 in the final layer.
  "lightningdit": dict(norm="rmsnorm", mlp="swiglu", pos_embed="both", qk_norm=""),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"Unknown digits variant {arg!r}; expected one of {sorted(VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 2000
  c.batch_size = 64  # Global batch, split over all devices.
  c.grad_accum_steps = 1  # Micro-batches per step (lax.scan), each batch_size / steps.
  c.parallelism = "pmap"  # "pmap" (data parallel) | "mesh" (jit over a device mesh).
  # Mesh axis sizes (one may be -1: all remaining devices); arrays under fsdp_min_size
  # elements are not FSDP-sharded.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, fsdp_min_size=2**14))
  # "" or a jax.checkpoint_policies name ("nothing_saveable", "dots_saveable", ...): remat
  # of the whole forward per (micro-)batch; per-block remat is config.model.remat.
  c.step_remat_policy = ""
  c.distributed = False  # jax.distributed.initialize() from the environment (multi-host).

  c.log_every = 100
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  c.sample_every = 1000  # Writes samples/step_XXXXXX.png; 0 disables.
  c.max_bad_steps = 20  # Stop after this many consecutive non-finite steps.
  c.progress_bar = True

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # Or "folder": class folders under data.path (root/<class>/*.png).
  c.data.path = ""  # For "folder": the root; set model.num_classes to its class count.
  c.data.resolution = 8
  c.data.channels = 1
  c.data.num_classes = 10
  # Image / caption folders only: aspect-ratio buckets, one per batch (docs/data.md).
  c.data.buckets = False
  c.data.bucket_divisor = 0  # 0: resolution / 16 rounded to a multiple of the patch size.
  c.data.bucket_max_ratio = 4.0

  c.model = ml_collections.ConfigDict()
  c.model.input_size = 8
  c.model.patch_size = 2
  c.model.in_channels = 1
  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.model.num_classes = 10
  c.model.class_dropout_prob = 0.1  # Label dropout, drawn by the train loop (not a DiT field).
  c.model.learn_sigma = False
  c.model.block = "adaln_zero"  # How the condition enters the blocks (dit.models.dit.BLOCKS).
  # Block options (dit.models.dit.DiT): norm "layernorm" | "rmsnorm"; mlp "gelu" | "swiglu";
  # pos_embed "sincos" | "rope" | "both"; qk_norm "" | "layernorm" | "rmsnorm".
  c.model.norm = "layernorm"
  c.model.mlp = "gelu"
  c.model.pos_embed = "sincos"
  c.model.rope_theta = 10000.0
  c.model.qk_norm = ""
  c.model.update(VARIANTS[arg])
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
  c.diffusion.weighting = "min_snr"  # "uniform" | "min_snr" (Hang et al. 2023).
  c.diffusion.min_snr_gamma = 5.0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3
  c.optim.schedule = "cosine"  # "constant" | "cosine", after linear warmup.
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0  # Global-norm clipping; 0 disables.
  c.optim.ema_decay = 0.999
  c.optim.ema_warmup = True  # decay_t = min(decay, (1 + t) / (10 + t)).
  # "sp" (standard) | "mup": init and per-layer learning rates scaled by width so that the
  # optim settings tuned at hidden_size = mup.base_width transfer to other widths (docs/mup.md).
  c.parametrization = "sp"
  c.mup = ml_collections.ConfigDict(dict(base_width=128))

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "ddim"
  c.sample.steps = 50
  c.sample.cfg_scale = 4.0
  c.sample.eta = 0.0
  c.sample.num = 100  # The grid: one row per class.
  c.sample.use_ema = True

  c.eval = ml_collections.ConfigDict()
  c.eval.metric = "digits"  # "digits" (classifier accuracy + feature FD) | "fid".
  c.eval.every = 0  # Evaluate every N train steps (0: only via dit.evaluate).
  c.eval.num_samples = 1000
  c.eval.batch_size = 500
  c.eval.best_metric = "accuracy"  # Keep the best checkpoint by this metric ...
  c.eval.best_mode = "max"  # ... "max" or "min" (e.g. FID).
  c.eval.inception_path = ""  # For "fid": pytorch-fid's pt_inception-2015-12-05-6726825d.pth.
  c.eval.ref_stats = ""  # For "fid": .npz with mu/sigma (ADM or pytorch-fid layout).
  c.eval.dinov2_path = ""  # For "fd_dinov2": a Hugging Face DINOv2 directory (ViT-L/14).
  c.eval.dinov2_ref_stats = ""  # For "fd_dinov2": dit.fid_stats --feature=dinov2 output.
  return c
