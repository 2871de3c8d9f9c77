"""Sampling from a trained DiT: library functions and the `dit.sample` command.

  python -m dit.sample --config=configs/digits.py --workdir=runs/digits --num=100 \
      --out=grid.png [--sampler=ddim --steps=50 --cfg_scale=4.0 --seed=0]
  python -m dit.sample --config=configs/t2i_pixart.py --workdir=runs/t2i \
      --prompt="a handwritten digit seven" [--prompt="the number 3" ...] --num=16
  python -m dit.sample --workdir=DIR    # config from DIR/config.json (dit.train, convert)

Text-to-image runs the whole pipeline: prompt -> T5 (config.text.t5_path; "" = the offline
demo encoder) -> DiT sampler with classifier-free guidance -> VAE decode (config.vae.path;
"" = pixel space) -> PNG. An empty prompt means the model's null caption.

The whole sampling loop is one jitted `lax.scan` (dit.diffusion.samplers); classifier-free
guidance runs the conditional and unconditional halves as one batch.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from ml_collections import config_flags
from PIL import Image

from dit.cli import UserError, run_command
from dit.diffusion import guidance, samplers, schedules


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  d = config.diffusion
  return schedules.make_schedule(
    d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "model",
    "shape",
    "sampler",
    "steps",
    "prediction",
    "learn_sigma",
    "eta",
    "cfg_scale",
    "lcm_original_steps",
  ),
)
def _generate(
  params,
  cond,
  key,
  schedule,
  cfg_scale,
  eta,
  *,
  model,
  shape,
  sampler,
  steps,
  prediction,
  learn_sigma,
  lcm_original_steps,
):
  noise_key, sample_key = jax.random.split(key)
  x_T = jax.random.normal(noise_key, shape, jnp.float32)

  def model_fn(x, t, c):
    return model.apply({"params": params}, x, t, c)

  if model.guidance_embedding:
    # A consistency-distilled student learnt the guided teacher: the scale is an input and
    # each step is one unguided pass.
    guided = dict(cond or {}, guidance=jnp.full((shape[0],), cfg_scale, jnp.float32))
    denoise = lambda x, t: model_fn(x, t, guided)
  elif cond is None:
    denoise = lambda x, t: model_fn(x, t, None)
  else:
    denoise = guidance.cfg_denoise(model_fn, cond, cfg_scale)
  return samplers.sample(
    denoise,
    x_T,
    sample_key,
    schedule,
    sampler=sampler,
    steps=steps,
    prediction=prediction,
    learn_sigma=learn_sigma,
    eta=eta,
    lcm_original_steps=lcm_original_steps,
  )


def generate(
  config: ml_collections.ConfigDict,
  model,
  params,
  cond: dict | None,
  key: jax.Array,
  num: int,
  *,
  schedule: schedules.Schedule | None = None,
  sampler: str | None = None,
  steps: int | None = None,
  cfg_scale: float | None = None,
) -> jax.Array:
  """Samples `num` images (num, H, W, C) in [-1, 1]; `cond` holds (num, ...) arrays.

  Latent models (config.vae.path set) return the unclipped latents; see `decode`. Students of
  consistency distillation (model.guidance_embedding) get cfg_scale as an input instead of
  guidance, and the LCM sampler uses their distillation grid (config.distill).
  """
  s = config.sample
  sampler = sampler or s.sampler
  if sampler not in samplers.SAMPLERS:
    raise UserError(f"Unknown sampler {sampler!r}; valid samplers: {', '.join(samplers.SAMPLERS)}.")
  steps = s.steps if steps is None else steps
  if not 1 <= steps <= config.diffusion.num_timesteps:
    raise UserError(f"--steps must be in [1, {config.diffusion.num_timesteps}], got {steps}.")
  if sampler == "lcm" and not 1 <= steps <= samplers.LCM_MAX_STEPS:
    raise UserError(
      f"--steps for the LCM sampler must be in [1, {samplers.LCM_MAX_STEPS}], got {steps}; "
      "a consistency model gains nothing from more steps."
    )
  lcm_original_steps = config.distill.num_ddim_timesteps if "distill" in config else 50
  m = config.model
  images = _generate(
    params,
    cond,
    key,
    schedule if schedule is not None else make_schedule(config),
    cfg_scale=float(s.cfg_scale if cfg_scale is None else cfg_scale),
    eta=float(s.eta),
    model=model,
    shape=(num, m.input_size, m.input_size, m.in_channels),
    sampler=sampler,
    steps=steps,
    prediction=config.diffusion.prediction,
    learn_sigma=m.learn_sigma,
    lcm_original_steps=lcm_original_steps,
  )
  return images if vae_path(config) else jnp.clip(images, -1.0, 1.0)


# ---- Text and latents --------------------------------------------------------------------


def vae_path(config: ml_collections.ConfigDict) -> str:
  """config.vae.path, "" for pixel-space models (and configs without a vae section)."""
  return config.vae.get("path", "") if "vae" in config else ""


def text_config(config: ml_collections.ConfigDict):
  """config.text (or config.data.text); {} means the offline demo encoder's defaults."""
  if "text" in config:
    return config.text
  return config.data.get("text", None) or {}


def _missing_model_files(kind: str, path: str) -> list[str]:
  """What a T5 or VAE directory lacks, as "path/file" strings ([] = complete)."""
  if not os.path.isdir(path):
    return [f"{path} (no such directory)"]
  if kind == "t5" and os.path.isdir(os.path.join(path, "text_encoder")):
    # A diffusers pipeline root: the encoder and its tokenizer live in subdirectories.
    return _missing(os.path.join(path, "text_encoder"), ["config.json", "model"]) + _missing(
      os.path.join(path, "tokenizer"), ["tokenizer"]
    )
  if kind == "t5":
    return _missing(path, ["config.json", "model", "tokenizer"])
  return _missing(path, ["config.json", "diffusion_pytorch_model"])


def _missing(path: str, needs: list[str]) -> list[str]:
  have = set(os.listdir(path)) if os.path.isdir(path) else set()
  missing = []
  for need in needs:
    if need == "tokenizer":
      options = ["spiece.model", "tokenizer.json"]
    elif need == "config.json":
      options = [need]
    else:  # Weights: single file or a sharded index.
      options = [f"{need}.safetensors", f"{need}.safetensors.index.json"]
    if not have & set(options):
      missing.append(os.path.join(path, " or ".join(options)))
  return missing


def resolve_vae_dir(path: str) -> str:
  """A VAE directory, or a diffusers pipeline root holding one in vae/."""
  sub = os.path.join(path, "vae")
  if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(sub):
    return sub
  return path


def check_model_dirs(config: ml_collections.ConfigDict) -> None:
  """Raises UserError listing every file missing from the T5 and VAE directories at once."""
  missing = []
  t5_path = text_config(config).get("t5_path", "")
  if t5_path and config.model.get("caption_channels", 0):
    missing += _missing_model_files("t5", t5_path)
  if vae_path(config):
    missing += _missing_model_files("vae", resolve_vae_dir(vae_path(config)))
  if missing:
    raise UserError(
      "Model directories are incomplete (config.text.t5_path / config.vae.path); missing: "
      + "; ".join(missing)
    )


def text_encoder(config: ml_collections.ConfigDict):
  """The TextEncoder of config.text, checked against config.model's caption size."""
  from dit.data import text as text_lib

  check_model_dirs(config)
  try:
    encoder = text_lib.make_text_encoder(text_config(config))
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"Cannot load the text encoder of config.text: {e}") from e
  m = config.model
  if encoder.dim != m.caption_channels:
    raise UserError(
      f"The text encoder gives {encoder.dim}-d embeddings but config.model.caption_channels="
      f"{m.caption_channels}; they must be equal."
    )
  if encoder.max_length > m.get("caption_length", 120):
    raise UserError(
      f"config.text.max_length={encoder.max_length} exceeds config.model.caption_length="
      f"{m.get('caption_length', 120)} (the null caption's length)."
    )
  return encoder


def text_cond(config: ml_collections.ConfigDict, prompts: Sequence[str]) -> dict:
  """Prompts (B strings) -> {"text": (B, L, D), "text_mask": (B, L), "drop": (B,) bool}.

  An empty (or all-space) prompt selects the model's null caption (drop=True). Prompts
  longer than config.text.max_length tokens are truncated with a warning, silently, or
  rejected, per config.text.overflow.
  """
  prompts = [str(p) for p in prompts]
  if not config.model.get("caption_channels", 0):
    raise UserError("This model has no text conditioning (config.model.caption_channels=0).")
  encoder = text_encoder(config)
  try:
    emb, mask = encoder.encode(prompts)
  except ValueError as e:  # overflow="error".
    raise UserError(str(e)) from e
  cond = {
    "text": emb,
    "text_mask": mask,
    "drop": jnp.asarray([not p.strip() for p in prompts], bool),
  }
  if config.model.get("size_conditioning", False):
    # PixArt-alpha 1024px micro-conditioning: the image size in pixels, square.
    pixels = config.model.input_size * (8 if vae_path(config) else 1)
    cond["resolution"] = jnp.full((len(prompts), 2), pixels, jnp.float32)
    cond["aspect_ratio"] = jnp.ones((len(prompts), 1), jnp.float32)
  return cond


def digit_prompts(config: ml_collections.ConfigDict, labels) -> list[str]:
  """config.sample.prompt_template filled with each label's digit ("{name}", "{digit}")."""
  from dit.data import digits

  template = config.sample.get("prompt_template", "")
  if not template:
    raise UserError(
      "Text-to-image sampling needs --prompt (config.sample.prompt_template is empty)."
    )
  return [template.format(name=digits.DIGIT_NAMES[int(y)], digit=int(y)) for y in labels]


def label_cond(config: ml_collections.ConfigDict, labels) -> dict | None:
  """The condition for digit/class `labels` (B,): class labels, or prompts from the template."""
  if config.model.num_classes:
    return {"label": jnp.asarray(labels, jnp.int32)}
  if config.model.get("caption_channels", 0):
    return text_cond(config, digit_prompts(config, labels))
  return None


def decode(config: ml_collections.ConfigDict, x: jax.Array) -> jax.Array:
  """Model outputs -> images in [-1, 1]: VAE-decoded latents, or pixels as they are."""
  if not vae_path(config):
    return x
  check_model_dirs(config)
  return _load_vae(resolve_vae_dir(vae_path(config))).decode(x)


@functools.lru_cache(maxsize=2)
def _load_vae(path: str):
  from dit.models import vae as vae_lib

  try:
    return vae_lib.VAE.load(path)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"Cannot load the VAE of config.vae.path: {e}") from e


def grid_labels(num: int, num_classes: int) -> np.ndarray:
  """Labels sorted into equal rows: num=100, 10 classes -> ten of each, row by row."""
  return (np.arange(num) * num_classes // num).astype(np.int32)


def grid_rows(config: ml_collections.ConfigDict) -> int:
  """Rows of the sample grid: one per class, or per digit prompt for text models."""
  if config.model.num_classes:
    return config.model.num_classes
  if config.model.get("caption_channels", 0) and config.sample.get("prompt_template", ""):
    return 10
  return 0


def class_grid(config, model, params, schedule, key, num: int | None = None) -> jax.Array:
  """`config.sample.num` samples, one row per class (or per digit prompt), decoded to pixels."""
  num = num or config.sample.num
  rows = grid_rows(config)
  cond = label_cond(config, grid_labels(num, rows)) if rows else None
  return decode(config, generate(config, model, params, cond, key, num, schedule=schedule))


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8, (N, H, W, C)."""
  images = np.asarray(jax.device_get(images), np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images, path: str, nrow: int = 10, upscale: int | None = None) -> None:
  """Writes (N, H, W, C) images in [-1, 1] as a PNG grid with `nrow` images per row."""
  x = to_uint8(images)
  n, h, w, c = x.shape
  rows = -(-n // nrow)
  x = np.concatenate([x, np.zeros((rows * nrow - n, h, w, c), np.uint8)])
  x = x.reshape(rows, nrow, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, nrow * w, c)
  image = Image.fromarray(x[..., 0] if c == 1 else x[..., :3])
  upscale = upscale or max(1, 320 // (nrow * w))  # Tiny digits stay visible.
  if upscale > 1:
    image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
  image.save(path)


def load_params(config: ml_collections.ConfigDict, workdir: str, use_ema: bool = True):
  """(model, params) of the newest checkpoint in `workdir` (EMA params by default).

  Reads checkpoints of dit.train and of `python -m dit.models.convert`; the params must have
  the shapes config.model gives (else a UserError lists the differences).
  """
  from flax import traverse_util

  from dit.models import dit as dit_model

  ckpt_dir = os.path.join(os.path.abspath(workdir), "ckpt")
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"No checkpoints in {workdir!r} (expected {ckpt_dir}); train first.")
  try:
    model = dit_model.build_model(config.model)
    expected = traverse_util.flatten_dict(dit_model.abstract_params(model), sep="/")
  except ValueError as e:
    raise UserError(f"Bad config.model: {e}") from e
  # Restored as saved (no target): only the params are needed, not the optimizer's config,
  # and converted checkpoints of models dit.train cannot initialise load too.
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers=handlers)
  state, errors = None, []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      args = ocp.args.Composite(state=ocp.args.StandardRestore())
      state = mngr.restore(step, args=args)["state"]
      break
    except Exception as e:  # Orbax raises many types for a damaged checkpoint.
      errors.append(f"step {step}: {type(e).__name__}")
      print(f"warning: checkpoint step {step} in {ckpt_dir} is unreadable; trying an older one.")
  if state is None:
    raise UserError(f"No readable checkpoint in {ckpt_dir} ({'; '.join(errors) or 'none'}).")
  params = state["ema_params" if use_ema else "params"]
  got = traverse_util.flatten_dict(params, sep="/")
  bad = sorted(set(expected) ^ set(got))
  bad += [
    f"{k}: checkpoint {got[k].shape}, config {expected[k].shape}"
    for k in sorted(set(expected) & set(got))
    if tuple(got[k].shape) != tuple(expected[k].shape)
  ]
  if bad:
    raise UserError(
      f"The checkpoint in {ckpt_dir} does not fit config.model ({len(bad)} differences, e.g. "
      f"{bad[:5]}); pass the config it was trained or converted with."
    )
  params = jax.tree.map(
    lambda p, a: jnp.asarray(p, a.dtype), params, dit_model.abstract_params(model)
  )
  return model, params


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json that dit.train or dit.models.convert wrote to `workdir`, locked."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"No --config given and {path!r} does not exist; pass --config.")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.lock()
  return config


# ---- Command line ----------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a command (modules import cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  flags.DEFINE_string("workdir", None, "Workdir holding ckpt/ (and config.json).")
  flags.DEFINE_integer("num", 64, "Number of samples.")
  flags.DEFINE_string("out", "grid.png", "Output: .png grid or .npz array (uint8 images).")
  flags.DEFINE_string("sampler", None, "Sampler name; default config.sample.sampler.")
  flags.DEFINE_integer("steps", None, "Sampling steps; default config.sample.steps.")
  flags.DEFINE_float("cfg_scale", None, "Guidance scale; default config.sample.cfg_scale.")
  flags.DEFINE_integer("seed", 0, "PRNG seed.")
  flags.DEFINE_list("labels", None, "Class labels (default: equal rows of all classes).")
  flags.DEFINE_bool("raw_params", False, "Use the raw instead of the EMA parameters.")
  flags.DEFINE_multi_string(
    "prompt", None, "Text prompt (repeat for several; one row each); '' = the null caption."
  )
  flags.DEFINE_string("t5", None, "Overrides config.text.t5_path (a local T5 directory).")
  flags.DEFINE_string("vae", None, "Overrides config.vae.path (a diffusers VAE directory).")


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


def sample_cond(config: ml_collections.ConfigDict, num: int, prompts, labels) -> tuple[dict, int]:
  """The condition for `num` samples from --prompt / --labels, and images per grid row."""
  m = config.model
  if prompts is not None:
    if not m.get("caption_channels", 0):
      raise UserError("--prompt needs a text-to-image model (config.model.caption_channels > 0).")
    rows = grid_labels(num, len(prompts))
    per_row = num // len(prompts) if num % len(prompts) == 0 else int(np.ceil(np.sqrt(num)))
    return text_cond(config, [prompts[i] for i in rows]), per_row
  if labels:
    if not m.num_classes and not m.get("caption_channels", 0):
      raise UserError("--labels needs a class- or text-conditional model.")
    n = m.num_classes or 10
    values = np.resize(np.asarray([int(v) for v in labels], np.int32), num)
    if values.min() < 0 or values.max() >= n:
      raise UserError(f"--labels must be in [0, {n}), got {labels}.")
    return label_cond(config, values), int(np.ceil(np.sqrt(num)))
  rows = grid_rows(config)
  if m.get("caption_channels", 0) and not rows:
    raise UserError("This text-to-image model needs --prompt.")
  cond = label_cond(config, grid_labels(num, rows)) if rows else None
  return cond, int(np.ceil(np.sqrt(num)))


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None:
    raise UserError("--workdir is required.")
  config = FLAGS.config if FLAGS.config is not None else load_workdir_config(FLAGS.workdir)
  config = _with_model_dirs(config, FLAGS.t5, FLAGS.vae)
  if FLAGS.num < 1:
    raise UserError(f"--num must be positive, got {FLAGS.num}.")
  check_model_dirs(config)  # Before the (slow) checkpoint restore.
  model, params = load_params(config, FLAGS.workdir, use_ema=not FLAGS.raw_params)
  cond, per_row = sample_cond(config, FLAGS.num, FLAGS.prompt, FLAGS.labels)
  images = generate(
    config,
    model,
    params,
    cond,
    jax.random.PRNGKey(FLAGS.seed),
    FLAGS.num,
    sampler=FLAGS.sampler,
    steps=FLAGS.steps,
    cfg_scale=FLAGS.cfg_scale,
  )
  images = decode(config, images)
  out = FLAGS.out
  if out.endswith(".npz"):
    np.savez(out, images=to_uint8(images))
  else:
    save_grid(images, out, nrow=per_row)
  print(f"wrote {out}")


def cli() -> None:
  """Console-script entry point (`dit-sample`)."""
  define_flags()
  run_command(main)


if __name__ == "__main__":
  cli()
