"""Generation: a model and its conditioning -> denoiser -> sampler -> decode -> images.

The library under `dit.sample` (and `dit.evaluate`, the train loop's sample grids, the
experiments and notebooks):

  model, params = load_params(config, workdir)             # EMA params of the newest step
  cond, per_row = sample_cond(config, 16, prompts=None, labels=[3])
  x = generate(config, model, params, cond, key, 16, sampler="dpmpp_2m", steps=20)
  save_grid(decode(config, x), "grid.png", nrow=per_row)

Conditioning: class labels, text through T5 (config.text.t5_path; "" = the offline demo
encoder), and the null condition for classifier-free guidance (cond["drop"]). Latent models
are decoded with the VAE of config.vae.path. The whole sampling loop is one jitted
`lax.scan` (dit.diffusion.samplers); guidance runs the conditional and unconditional halves
as one batch.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from dit import checkpoint
from dit.cli import UserError
from dit.diffusion import guidance, samplers, schedules
from dit.models import dit as dit_model

# ---- Sampling ----------------------------------------------------------------------------


@functools.partial(
  jax.jit, static_argnames=("model", "shape", "settings", "prediction", "learn_sigma")
)
def _generate(
  params, cond, key, schedule, cfg_scale, *, model, shape, settings, prediction, learn_sigma
):
  noise_key, sample_key = jax.random.split(key)
  x_T = jax.random.normal(noise_key, shape, jnp.float32)
  denoise = make_denoise(model, params, cond, cfg_scale, shape[0])
  return samplers.sample(
    denoise, x_T, sample_key, schedule, settings, prediction=prediction, learn_sigma=learn_sigma
  )


def make_denoise(model, params, cond: dict | None, cfg_scale, batch: int) -> samplers.Denoise:
  """`denoise(x, t)` of `model` on `cond`: with classifier-free guidance at `cfg_scale`.

  A consistency-distilled student (model.guidance_embedding) learnt the guided teacher: the
  scale is its input and each step is one unguided pass.
  """

  def model_fn(x, t, c):
    return model.apply({"params": params}, x, t, c)

  if model.guidance_embedding:
    guided = dict(cond or {}, guidance=jnp.full((batch,), cfg_scale, jnp.float32))
    return lambda x, t: model_fn(x, t, guided)
  if cond is None:
    return lambda x, t: model_fn(x, t, None)
  return guidance.cfg_denoise(model_fn, cond, cfg_scale)


def check_scale(name: str, value) -> float:
  """`value` as a float; a UserError naming `name` unless it is finite and >= 0."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  if not math.isfinite(number) or number < 0:
    raise UserError(f"{name} must be a finite number >= 0, got {value!r}.")
  return number


def check_sample_config(config: ml_collections.ConfigDict, cfg_scale=None, eta=None) -> None:
  """Raises UserError for a guidance scale or DDIM eta (flags, else config.sample) that is
  not finite or is negative: before any checkpoint is read or any step trained."""
  pairs = (("cfg_scale", cfg_scale, "--cfg_scale"), ("eta", eta, "eta"))
  for key, value, flag in pairs:
    if value is not None:
      check_scale(flag, value)
    elif key in config.sample:
      check_scale(f"config.sample.{key}", config.sample[key])


def sampler_settings(config: ml_collections.ConfigDict, **overrides) -> samplers.SamplerSettings:
  """The sampler settings of config.sample (and config.distill), with non-None overrides.

  Bad settings are a UserError naming the value and the valid ones (a non-finite or
  negative eta too).
  """
  eta = overrides.get("eta")
  check_scale(
    "eta" if eta is not None else "config.sample.eta", config.sample.eta if eta is None else eta
  )
  steps, sampler = overrides.get("steps"), overrides.get("sampler") or config.sample.sampler
  T = config.diffusion.num_timesteps
  if steps is not None and not 1 <= steps <= T:
    raise UserError(f"--steps must be in [1, {T}], got {steps}.")
  if sampler == "lcm" and steps is not None and not 1 <= steps <= samplers.LCM_MAX_STEPS:
    raise UserError(
      f"--steps for the LCM sampler must be in [1, {samplers.LCM_MAX_STEPS}], got {steps}; "
      "a consistency model gains nothing from more steps."
    )
  try:
    return samplers.SamplerSettings.from_config(config, **overrides)
  except ValueError as e:
    raise UserError(str(e)) from e


def generate(
  config: ml_collections.ConfigDict,
  model,
  params,
  cond: dict | None,
  key: jax.Array,
  num: int,
  *,
  schedule: schedules.Schedule | None = None,
  settings: samplers.SamplerSettings | None = None,
  cfg_scale: float | None = None,
  **overrides,
) -> jax.Array:
  """Samples `num` images (num, H, W, C) in [-1, 1]; `cond` holds (num, ...) arrays.

  settings: the sampler settings; default `sampler_settings(config, **overrides)` (e.g.
  sampler="dpmpp_2m", steps=20). Latent models (config.vae.path set) return the unclipped
  latents; see `decode`. Students of consistency distillation get cfg_scale as an input
  instead of guidance, and the LCM sampler uses their distillation grid (config.distill).
  """
  if settings is None:
    settings = sampler_settings(config, **overrides)
  if cfg_scale is None:
    cfg_scale = check_scale("config.sample.cfg_scale", config.sample.cfg_scale)
  m = config.model
  images = _generate(
    params,
    cond,
    key,
    schedule if schedule is not None else schedules.from_config(config.diffusion),
    check_scale("cfg_scale", cfg_scale),
    model=model,
    shape=(num, m.input_size, m.input_size, m.in_channels),
    settings=settings,
    prediction=config.diffusion.prediction,
    learn_sigma=m.learn_sigma,
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
  return {**cond, **size_cond(config, len(prompts))}


def size_cond(config: ml_collections.ConfigDict, num: int) -> dict:
  """PixArt-alpha's micro-conditioning for `num` images of the trained size, {} if unused.

  {"resolution": (num, 2) (height, width in pixels), "aspect_ratio": (num, 1)}: square images
  of config.model.input_size, times 8 for latents.
  """
  if not config.model.get("size_conditioning", False):
    return {}
  pixels = config.model.input_size * (8 if vae_path(config) else 1)
  return {
    "resolution": jnp.full((num, 2), pixels, jnp.float32),
    "aspect_ratio": jnp.ones((num, 1), jnp.float32),
  }


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


def load_params(config: ml_collections.ConfigDict, workdir: str, use_ema: bool = True):
  """(model, params) of the newest readable checkpoint in `workdir` (EMA params by default).

  Reads checkpoints of dit.train and of `python -m dit.models.convert`; the params must have
  the shapes config.model gives (else a UserError lists the differences).
  """
  try:
    model = dit_model.build_model(config.model)
    abstract = dit_model.abstract_params(model)
  except ValueError as e:
    raise UserError(f"Bad config.model: {e}") from e
  return model, checkpoint.restore_params(workdir, abstract, use_ema=use_ema)
