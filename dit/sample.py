"""`dit.sample` (dit-sample): sample a trained (or converted) DiT to an image grid or an .npz.

  dit-sample --workdir=runs/digits                  # config.json, config.sample.num samples
  dit-sample --workdir=runs/digits --num=100 --out=out/grid.png --labels=3,7
  dit-sample --workdir=runs/digits --sampler=dpmpp_2m --steps=20 --karras --cfg_scale=4.0
  dit-sample --workdir=runs/digits --init_image=seven.png --strength=0.6      # img2img
  dit-sample --workdir=runs/digits --init_image=seven.png --mask=keep.png     # inpainting
  dit-sample --workdir=runs/digits --config.sample.eta=1.0   # a config.json key changed
  dit-sample --workdir=runs/t2i --prompt="a handwritten seven" --prompt="the number 3" --num=16
  dit-sample --workdir=runs/digits --height=8 --width=16     # another size or aspect ratio

The config is WORKDIR/config.json (what dit.train or the converter wrote), or --config, whose
model must match it. Text-to-image runs the whole pipeline: prompt -> T5 (config.text.t5_path;
"" = the offline demo encoder) -> DiT sampler with classifier-free guidance -> VAE decode
(config.vae.path; "" = pixel space) -> image. --height / --width (pixels, multiples of
patch_size x the VAE factor) sample another size or aspect ratio than the trained one, with no
config change (position embeddings extend to any grid). Editing images have the sampled size
(not resized); a mask is greyscale, white = keep the initial image, black = generate. Every
input is checked before the checkpoint is read. The library behind it is dit/generate.py.
"""

from __future__ import annotations

import json
import textwrap

import jax
import ml_collections
import numpy as np
from absl import flags

from dit import checkpoint, evaluation, generate
from dit import cli as cli_lib
from dit.cli import UserError, run_command

# ---- Command line ----------------------------------------------------------------------

FLAGS = flags.FLAGS


# (kind, name, default, help) of dit.sample's own flags; --config, --workdir and
# --config_keys come from dit.cli.
_FLAGS = (
  ("integer", "num", None, "Number of samples; default config.sample.num (64 if it is 0)."),
  ("string", "out", "grid.png", "Output file: an image grid (.png, .jpg, ...) or .npz "
   "(uint8 images, N x H x W x C); missing parent directories are created."),
  ("string", "sampler", None, "Sampler (values below); default config.sample.sampler."),
  ("integer", "steps", None, "Sampling steps: grid points (model evaluations; heun 2 x steps "
   "- 1); default config.sample.steps."),
  ("bool", "karras", None, "Karras sigmas (the diffusion samplers that take them)."),
  ("float", "cfg_scale", None, "Guidance scale (1 = no guidance); default "
   "config.sample.cfg_scale."),
  ("float", "guidance_rescale", None, "Guidance rescale phi, in [0, 1] (Lin et al. 2024); 0 = "
   "off."),
  ("list", "guidance_interval", None, "lo,hi: guide only where lo <= sigma <= hi, in k-sigma "
   "units sqrt((1 - alpha_bar) / alpha_bar) (Kynkaanniemi et al. 2024); default: every step."),
  ("integer", "seed", 0, "PRNG seed."),
  ("list", "labels", None, "Class labels, repeated to --num; default: equal rows of all "
   "classes."),
  ("bool", "raw_params", False, "Use the raw instead of the EMA parameters."),
  ("multi_string", "prompt", None, "Text prompt (repeat for several; one row each); '' = the "
   "null caption."),
  ("string", "init_image", None, "img2img / inpainting: an image file (or an .npz of "
   "images) of the model's image size, not resized."),
  ("float", "strength", None, "img2img: the fraction of the sampling grid re-run from "
   "--init_image, in (0, 1], at least one step; default 0.6, or 1.0 with --mask."),
  ("string", "mask", None, "Inpainting: a greyscale image of the model's size; white = keep "
   "--init_image, black = generate."),
  ("integer", "height", None, "Image height in pixels, a multiple of patch_size x the VAE "
   "factor; default: the trained size."),
  ("integer", "width", None, "Image width in pixels, a multiple of patch_size x the VAE "
   "factor; default: the trained size."),
  ("string", "t5", None, "Overrides config.text.t5_path (a local T5 directory)."),
  ("string", "vae", None, "Overrides config.vae.path (a diffusers VAE directory)."),
)  # fmt: skip


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Command-line flags, defined only when run as a command (modules import cleanly)."""
  cli_lib.define_config_flags(flag_values, "Workdir holding ckpt/ (and config.json).")
  for kind, name, default, text in _FLAGS:
    getattr(flags, f"DEFINE_{kind}")(name, default, text, flag_values=flag_values)


def help_notes() -> str:
  """The valid values of --sampler (both families), for --help."""
  choices = evaluation.config_choices()
  text = (
    "--sampler values: diffusion models: "
    + ", ".join(choices["sample.sampler (diffusion)"])
    + " (lcm: distilled models only); flow-matching models: "
    + ", ".join(choices["sample.sampler (flow)"])
    + ". Default time grids: the diffusion samplers use 'trailing' timestep spacing (starts at "
    "t = T - 1; config.sample.timestep_spacing: leading | linspace | trailing, each with "
    "diffusers' formula for that scheduler), lcm its distillation grid, the flow samplers "
    "'uniform' times (config.sample.spacing: uniform | diffusers)"
    + ". Editing (--init_image, --mask) and guidance (--guidance_rescale, --guidance_interval) "
    "work with every sampler of both families. See docs/samplers.md, docs/flow_matching.md "
    "and, for Python, docs/api.md."
  )
  return textwrap.fill(text, 100)


def _with_model_dirs(config: ml_collections.ConfigDict, t5: str | None, vae: str | None):
  """config with --t5 / --vae applied (adding the sections if the config lacks them)."""
  if t5 is None and vae is None:
    return config
  config = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  if t5 is not None:
    if "text" not in config:
      config.text = ml_collections.ConfigDict()
    config.text.t5_path = t5
  if vae is not None:
    if "vae" not in config:
      config.vae = ml_collections.ConfigDict()
    config.vae.path = vae
  config.lock()
  return config


def _interval(values) -> tuple[float, float] | None:
  if values is None:
    return None
  try:
    lo, hi = (float(v) for v in values)
  except ValueError as e:
    raise UserError(f"--guidance_interval takes two numbers lo,hi, got {','.join(values)}.") from e
  return lo, hi


def _edit_options(config: ml_collections.ConfigDict) -> dict:
  """x_init / strength / mask of generate() from --init_image, --strength and --mask."""
  if FLAGS.init_image is None:
    if FLAGS.mask is not None or FLAGS.strength is not None:
      raise UserError("--strength and --mask need --init_image (the image to edit).")
    return {}
  side, channels = generate.pixel_size(config)
  factor = side // config.model.input_size
  _, h, w, _ = generate.sample_shape(config, 1, FLAGS.height, FLAGS.width)
  images = generate.read_images(FLAGS.init_image, (h * factor, w * factor), channels)
  options = {"x_init": generate.encode(config, images)}
  if FLAGS.mask is not None:
    options["mask"] = generate.read_mask(FLAGS.mask, (h, w), factor)
  default = 1.0 if FLAGS.mask is not None else 0.6
  options["strength"] = default if FLAGS.strength is None else FLAGS.strength
  return options


def sample_options(config: ml_collections.ConfigDict) -> dict:
  """generate()'s keyword arguments from the flags, every one checked (nothing compiled)."""
  generate.check_sample_config(config, cfg_scale=FLAGS.cfg_scale)
  options = dict(
    settings=generate.sampler_settings(
      config, sampler=FLAGS.sampler, steps=FLAGS.steps, karras=FLAGS.karras
    ),
    cfg_scale=FLAGS.cfg_scale,
    guidance_rescale=FLAGS.guidance_rescale or 0.0,
    guidance_interval=_interval(FLAGS.guidance_interval),
    height=FLAGS.height,
    width=FLAGS.width,
  )
  generate.check_model_dirs(config)
  return {**options, **_edit_options(config)}


def _row_labels(config: ml_collections.ConfigDict, num: int, per_row: int) -> list[str] | None:
  """Class labels for the default grid when its rows are whole classes (e.g. 100 of 10)."""
  labels = generate.grid_row_labels(config)
  if FLAGS.labels or FLAGS.prompt or not labels or num != per_row * len(labels):
    return None
  return labels


def _config_source() -> str:
  return "--config" if FLAGS.config is not None else f"{FLAGS.workdir}/config.json"


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None:
    raise UserError("--workdir is required (it holds the checkpoints).")
  config, _ = checkpoint.command_config(
    FLAGS.workdir, FLAGS.config, cli_lib.workdir_overrides(), fixed=("model", "diffusion", "flow")
  )
  if FLAGS.config_keys:
    print(cli_lib.config_keys_text(config, _config_source()))
    return
  config = _with_model_dirs(config, FLAGS.t5, FLAGS.vae)
  num = FLAGS.num if FLAGS.num is not None else config.sample.get("num", 0) or 64
  if num < 1:
    raise UserError(f"--num must be positive, got {num}.")
  # Before the (slow) checkpoint restore: the output, the sampler, guidance, the editing
  # images, the conditioning, the model directories.
  out = generate.prepare_output(FLAGS.out)
  options = sample_options(config)
  cond, per_row = generate.sample_cond(config, num, FLAGS.prompt, FLAGS.labels)
  inputs = {k: v for k, v in options.items() if k != "cfg_scale"}
  generate.check_inputs(config, cond, num, **inputs)
  model, params = generate.load_params(config, FLAGS.workdir, use_ema=not FLAGS.raw_params)
  images = generate.generate(
    config, model, params, cond, jax.random.PRNGKey(FLAGS.seed), num, **options
  )
  images = generate.decode(config, images)
  if out.endswith(".npz"):
    np.savez(out, images=generate.to_uint8(images))
  else:
    caption = generate.grid_caption(config, options["settings"], options["cfg_scale"])
    labels = _row_labels(config, num, per_row)
    generate.save_grid(images, out, nrow=per_row, row_labels=labels, caption=caption)
  print(f"wrote {out}")


def cli() -> None:
  """Console-script entry point (`dit-sample`)."""
  run_command(main, define_flags, __doc__, help_notes)


if __name__ == "__main__":
  cli()
