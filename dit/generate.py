"""Generation: a model and its conditioning -> denoiser -> sampler -> decode -> images.

The library under `dit.sample` (and `dit.evaluate`, the train loop's sample grids, the
experiments and notebooks):

  config, model, params = load(workdir)                    # config.json, EMA params
  cond, per_row = sample_cond(config, 16, prompts=None, labels=[3])
  x = generate(config, model, params, cond, key, 16, sampler="dpmpp_2m", steps=20)
  save_grid(decode(config, x), "grid.png", nrow=per_row)
  # img2img / inpainting: start from images (model space), keep the mask == 1 region.
  x = generate(config, model, params, cond, key, 16, x_init=x, strength=0.6, mask=None)
  # Another size or aspect ratio than the trained one (pixels; multiples of the patch size
  # times the VAE factor): position embeddings (sin-cos, RoPE) extend to any grid.
  x = generate(config, model, params, cond, key, 16, height=192, width=320)

Conditioning: class labels, text through T5 (config.text.t5_path; "" = the offline demo
encoder), and the null condition for classifier-free guidance (cond["drop"]). Latent models
are decoded with the VAE of config.vae.path. The whole sampling loop is one jitted
`lax.scan` (dit.diffusion.samplers, or dit.diffusion.flow_samplers for flow-matching
models); guidance (with rescale and an interval) runs the conditional and unconditional
halves as one batch. Every input is checked before anything is compiled (labels within the
model's classes, one condition row per sample, editing images of the model's size, a
sampler the model can use), with errors in the caller's terms.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import zipfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dit import checkpoint
from dit.cli import UserError
from dit.diffusion import editing, flow_samplers, guidance, samplers, schedules
from dit.diffusion import flow as flow_lib
from dit.models import dit as dit_model

# ---- Sampling ----------------------------------------------------------------------------


_STATIC = ("model", "shape", "settings", "prediction", "learn_sigma", "flow", "edit", "guide")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(
  params,
  cond,
  key,
  schedule,
  cfg_scale,
  x_init,
  mask,
  *,
  model,
  shape,
  settings,
  prediction,
  learn_sigma,
  flow,
  edit,
  guide,
):
  noise_key, sample_key = jax.random.split(key)
  x_T = jax.random.normal(noise_key, shape, jnp.float32)
  rescale, interval = guide
  sigma_fn = flow.k_sigma if flow is not None else None
  denoise = make_denoise(
    model, params, cond, cfg_scale, shape[0], rescale, interval, schedule, sigma_fn
  )
  edits = dict(x_init=x_init, strength=edit, mask=mask)
  if flow is not None:  # Variance channels of a learn_sigma layout (SiT) are unused.
    model_fn = lambda x, t: denoise(x, t)[..., : shape[-1]]
    return flow_samplers.sample(model_fn, x_T, sample_key, flow, settings, **edits)
  return samplers.sample(
    denoise,
    x_T,
    sample_key,
    schedule,
    settings,
    prediction=prediction,
    learn_sigma=learn_sigma,
    **edits,
  )


def make_denoise(
  model,
  params,
  cond: dict | None,
  cfg_scale,
  batch: int,
  rescale: float = 0.0,
  interval: tuple[float, float] | None = None,
  schedule: schedules.Schedule | None = None,
  sigma_fn=None,
) -> samplers.Denoise:
  """`denoise(x, t)` of `model` on `cond`: with classifier-free guidance at `cfg_scale`
  (guidance rescale phi `rescale`; guidance only for k-sigmas in `interval`, mapped from t by
  `schedule`, or by `sigma_fn` for flow models).

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
  return guidance.cfg_denoise(
    model_fn, cond, cfg_scale, interval=interval, schedule=schedule, rescale=rescale,
    sigma_fn=sigma_fn,
  )  # fmt: skip


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


def sampler_settings(
  config: ml_collections.ConfigDict, **overrides
) -> samplers.SamplerSettings | flow_samplers.FlowSamplerSettings:
  """The sampler settings of config.sample (and config.distill), with non-None overrides:
  `FlowSamplerSettings` for a flow-matching model (config.flow), else `SamplerSettings`.

  Bad settings are a UserError naming the value and the valid ones (a non-finite or
  negative eta too); a sampler of the other family names both.
  """
  sampler = overrides.get("sampler") or config.sample.sampler
  if flow_lib.is_flow(config):
    if overrides.get("karras"):
      raise UserError(
        "Karras sigmas are a setting of the diffusion samplers; this is a flow-matching model "
        "(config.flow): leave out --karras (its grids: config.sample.spacing, shift)."
      )
    if sampler not in flow_samplers.FLOW_SAMPLERS:
      raise UserError(
        f"This is a flow-matching model (config.flow) and {sampler!r} is not a flow sampler"
        + (" (it samples discrete-time diffusion models)" if sampler in samplers.SAMPLERS else "")
        + f"; flow samplers: {', '.join(flow_samplers.FLOW_SAMPLERS)}."
      )
    try:
      return flow_samplers.FlowSamplerSettings.from_config(config, **overrides)
    except (TypeError, ValueError) as e:
      raise UserError(str(e)) from e
  if sampler in flow_samplers.FLOW_SAMPLERS and sampler not in samplers.SAMPLERS:
    raise UserError(
      f"{sampler!r} is a flow-matching sampler and this is a discrete-time diffusion model "
      f"(config.diffusion); its samplers: {', '.join(samplers.SAMPLERS)}."
    )
  if sampler == "lcm" and "distill" not in config and not config.model.get("guidance_embedding"):
    raise UserError(
      "The lcm sampler needs a consistency-distilled model (a config with a distill section, "
      "e.g. configs/digits_lcm.py); this model was not distilled and would give noise. Its "
      f"samplers: {', '.join(s for s in samplers.SAMPLERS if s != 'lcm')}."
    )
  eta = overrides.get("eta")
  check_scale(
    "eta" if eta is not None else "config.sample.eta", config.sample.eta if eta is None else eta
  )
  steps = overrides.get("steps")
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
  x_init=None,
  strength: float = 1.0,
  mask=None,
  guidance_rescale: float = 0.0,
  guidance_interval: tuple[float, float] | None = None,
  height: int | None = None,
  width: int | None = None,
  **overrides,
) -> jax.Array:
  """Samples `num` images (num, H, W, C) in [-1, 1]; `cond` holds (num, ...) arrays.

  settings: the sampler settings; default `sampler_settings(config, **overrides)` (e.g.
  sampler="dpmpp_2m", steps=20, karras=True). Latent models (config.vae.path set) return the
  unclipped latents; see `decode`. Students of consistency distillation get cfg_scale as an
  input instead of guidance, and the LCM sampler uses their distillation grid (config.distill).
  x_init, strength: img2img from x_init ((num or 1, H, W, C) in model space: pixels in [-1, 1],
    or latents, see `encode`), re-sampling the last `strength` in (0, 1] of the grid.
  mask: inpainting, (num or 1, H, W, 1 or C), 1 = keep x_init, 0 = generate; needs x_init.
  guidance_rescale: phi in [0, 1] (Lin et al. 2024); guidance_interval: (lo, hi) k-sigmas
    (EDM units) outside which guidance is off (Kynkaanniemi et al. 2024).
  height, width: the image size in pixels (default: the trained size, input_size times the VAE
    factor), multiples of patch_size x the VAE factor (`sample_shape`); models with size
    conditioning get this size as theirs, flow models with dynamic_shift its shift.
  Both model families (diffusion and flow matching) take every option. Bad inputs are a
  UserError naming them, before anything is compiled.
  """
  if settings is None:
    settings = sampler_settings(config, **overrides)
  if cfg_scale is None:
    cfg_scale = check_scale("config.sample.cfg_scale", config.sample.cfg_scale)
  m = config.model
  shape = sample_shape(config, num, height, width)
  flow = sample_flow(config, shape)
  if flow is None and schedule is None:
    schedule = schedules.from_config(config.diffusion)
  if cond is not None and (height, width) != (None, None):
    cond = {**cond, **size_cond(config, num, size=shape[1:3])}  # The size sampled.
  x_init, mask, guide = check_inputs(
    config, cond, num, settings, model=model, schedule=schedule, x_init=x_init,
    strength=strength, mask=mask, guidance_rescale=guidance_rescale,
    guidance_interval=guidance_interval, height=height, width=width,
  )  # fmt: skip
  images = _generate(
    params,
    cond,
    key,
    schedule,
    check_scale("cfg_scale", cfg_scale),
    x_init,
    mask,
    model=model,
    shape=shape,
    settings=settings,
    prediction=None if flow else config.diffusion.prediction,
    learn_sigma=m.learn_sigma,
    flow=flow,
    edit=float(strength),
    guide=guide,
  )
  return images if vae_path(config) else jnp.clip(images, -1.0, 1.0)


def check_inputs(
  config: ml_collections.ConfigDict,
  cond: dict | None,
  num: int,
  settings,
  *,
  model=None,
  schedule: schedules.Schedule | None = None,
  x_init=None,
  strength: float = 1.0,
  mask=None,
  guidance_rescale: float = 0.0,
  guidance_interval=None,
  height: int | None = None,
  width: int | None = None,
) -> tuple:
  """(x_init, mask, guidance options) of a `generate` call, checked: call it before reading a
  checkpoint to refuse bad inputs at once (dit.sample does; generate calls it too)."""
  m = config.model
  if model is None:
    model = dit_model.build_model(m)
  shape = sample_shape(config, num, height, width)
  flow = sample_flow(config, shape)
  if flow is None and schedule is None:
    schedule = schedules.from_config(config.diffusion)
  check_cond(config, cond, num)
  x_init, mask = check_edit(shape, x_init, strength, mask, settings.steps)
  rescale, interval = guidance_rescale, guidance_interval
  guide = check_guidance(model.guidance_embedding, cond, rescale, interval, schedule, flow)
  return x_init, mask, guide


def sample_shape(
  config: ml_collections.ConfigDict, num: int, height: int | None = None, width: int | None = None
) -> tuple[int, int, int, int]:
  """(num, h, w, C) in model space (latents or pixels) of images `height` x `width` pixels
  (each default: the trained size). A size that is not a positive multiple of patch_size
  times the VAE factor is a UserError naming it and the nearest valid sizes."""
  m = config.model
  factor = vae_factor(config)
  unit = m.get("patch_size", 1) * factor
  sides = []
  for name, value in (("height", height), ("width", width)):
    if value is None:
      sides.append(m.input_size)
      continue
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
      raise UserError(f"The image {name} must be a positive number of pixels, got {value!r}.")
    if value % unit:
      lower, upper = max(unit, value // unit * unit), (value // unit + 1) * unit
      why = f"patch_size {m.get('patch_size', 1)}" + (
        f" x VAE factor {factor}" if factor > 1 else ""
      )
      raise UserError(
        f"The image {name} {value} is not a multiple of {unit} pixels ({why}): this model "
        f"makes images in steps of {unit} pixels, e.g. {lower} or {upper}."
      )
    sides.append(int(value) // factor)
  return (num, sides[0], sides[1], m.in_channels)


def sample_flow(config: ml_collections.ConfigDict, shape: tuple[int, ...]):
  """The Flow of a flow-matching config (None for diffusion) for samples of `shape`: with
  config.flow.dynamic_shift, Flux's shift for that many tokens (not the trained size's)."""
  if not flow_lib.is_flow(config):
    return None
  flow = flow_lib.from_config(config)
  m = config.model
  if flow_lib.fields(config.flow)["dynamic_shift"] and shape[1:3] != (m.input_size,) * 2:
    p = m.get("patch_size", 1)
    flow = dataclasses.replace(
      flow, shift=flow_lib.dynamic_shift((shape[1] // p) * (shape[2] // p))
    )
  return flow


def check_cond(config: ml_collections.ConfigDict, cond: dict | None, num) -> None:
  """UserError unless `cond` has one row per sample and its labels are the model's classes."""
  if isinstance(num, bool) or not isinstance(num, int | np.integer) or num < 1:
    raise UserError(f"The number of samples must be a positive integer, got {num!r}.")
  for name, value in (cond or {}).items():
    rows = jnp.shape(value)[0] if jnp.ndim(value) else None
    if rows != num:
      raise UserError(
        f"cond[{name!r}] has {'no' if rows is None else rows} rows for {num} samples: give one "
        "per sample (sample_cond and --labels / --prompt repeat them to the number of samples)."
      )
  label = (cond or {}).get("label")
  if label is None or isinstance(label, jax.core.Tracer):
    return
  n = config.model.num_classes
  values = np.asarray(label)
  if not n:
    raise UserError("cond['label']: this model has no classes (config.model.num_classes=0).")
  bad = sorted({int(v) for v in values[(values < 0) | (values >= n)]})
  if bad:
    raise UserError(
      f"Labels {bad} are outside this model's classes [0, {n}) (config.model.num_classes={n})."
    )


def check_edit(shape: tuple[int, ...], x_init, strength, mask, steps: int):
  """(x_init, mask) broadcast to the sample `shape`, checked: UserErrors in the caller's terms."""
  if x_init is None:
    if mask is not None or strength != 1.0:
      raise UserError("img2img (strength < 1) and inpainting (a mask) need an initial image.")
    return None, None
  x_init = jnp.asarray(x_init, jnp.float32)
  x_init = x_init[None] if x_init.ndim == 3 else x_init
  n, size = shape[0], "x".join(map(str, shape[1:]))
  if tuple(x_init.shape[1:]) != shape[1:] or x_init.shape[0] not in (1, n):
    raise UserError(
      f"The initial image has shape {tuple(x_init.shape)}; this model makes {size} (H x W x C) "
      f"images, so it needs ({n} or 1, {', '.join(map(str, shape[1:]))})."
    )
  try:
    editing.img2img_start(steps, float(strength))
  except (TypeError, ValueError) as e:
    raise UserError(f"img2img: {e}.") from e
  if mask is not None:
    mask = jnp.asarray(mask, jnp.float32)
    mask = mask[None] if mask.ndim == 3 else mask
    ok = mask.ndim == 4 and mask.shape[0] in (1, n) and mask.shape[1:3] == shape[1:3]
    if not ok or mask.shape[3] not in (1, shape[3]):
      raise UserError(
        f"The inpainting mask has shape {tuple(mask.shape)}; it needs ({n} or 1, {shape[1]}, "
        f"{shape[2]}, 1 or {shape[3]}): the model's image size."
      )
  return jnp.broadcast_to(x_init, shape), mask


def check_guidance(guidance_embedding: bool, cond, rescale, interval, schedule, flow) -> tuple:
  """(rescale, interval) checked, as the static argument of the sampler's program."""
  rescale = float(rescale or 0.0)
  interval = None if interval is None else tuple(float(v) for v in interval)
  if not rescale and interval is None:
    return 0.0, None
  if guidance_embedding:
    raise UserError(
      "Guidance rescale and interval need classifier-free guidance; this consistency-distilled "
      "model takes the guidance scale as an input instead."
    )
  if cond is None:
    raise UserError("Guidance rescale and interval need a conditional model (labels or text).")
  if not 0.0 <= rescale <= 1.0:
    raise UserError(f"The guidance rescale must be in [0, 1], got {rescale}.")
  if interval is not None:
    if len(interval) != 2:
      raise UserError(f"The guidance interval is two k-sigmas lo,hi; got {interval}.")
    try:
      guidance.check_interval(interval, schedule, flow.k_sigma if flow else None)
    except ValueError as e:
      raise UserError(f"{e}.") from e
  return rescale, interval


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


def size_cond(config: ml_collections.ConfigDict, num: int, size=None) -> dict:
  """PixArt-alpha's micro-conditioning for `num` images of the trained size, {} if unused.

  {"resolution": (num, 2) (height, width in pixels), "aspect_ratio": (num, 1) height / width}:
  square images of config.model.input_size, or of size = (h, w) in model space (an
  aspect-ratio bucket, a sampled size), times 8 for latents.
  """
  if not config.model.get("size_conditioning", False):
    return {}
  scale = 8 if vae_path(config) else 1
  if size is None:
    pixels = config.model.input_size * scale
    return {
      "resolution": jnp.full((num, 2), pixels, jnp.float32),
      "aspect_ratio": jnp.ones((num, 1), jnp.float32),
    }
  h, w = (int(v) * scale for v in size)
  return {
    "resolution": jnp.tile(jnp.asarray([[h, w]], jnp.float32), (num, 1)),
    "aspect_ratio": jnp.full((num, 1), h / w, jnp.float32),
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


def encode(config: ml_collections.ConfigDict, images) -> jax.Array:
  """Images in [-1, 1] -> model space (x_init of `generate`): VAE latents, or the pixels."""
  if not vae_path(config):
    return jnp.asarray(images, jnp.float32)
  check_model_dirs(config)
  return _load_vae(resolve_vae_dir(vae_path(config))).encode(jnp.asarray(images, jnp.float32))


def vae_factor(config: ml_collections.ConfigDict) -> int:
  """Pixels per latent along each side: 1 in pixel space, else read from the VAE's
  config.json (8, that of Stable Diffusion's VAE, if it cannot be read)."""
  if not vae_path(config):
    return 1
  try:
    with open(os.path.join(resolve_vae_dir(vae_path(config)), "config.json")) as f:
      return 2 ** (len(json.load(f).get("block_out_channels", (0,) * 4)) - 1)
  except (OSError, ValueError, TypeError):
    return 8


def pixel_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(side in pixels, channels) of the model's images: its input, or the VAE's decoded size."""
  m = config.model
  if not vae_path(config):
    return m.input_size, m.in_channels
  check_model_dirs(config)
  vae = _load_vae(resolve_vae_dir(vae_path(config)))
  return m.input_size * vae.config.downsample_factor, vae.config.in_channels


@functools.lru_cache(maxsize=2)
def _load_vae(path: str):
  from dit.models import vae as vae_lib

  try:
    return vae_lib.VAE.load(path)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"Cannot load the VAE of config.vae.path: {e}") from e


# ---- Files in and out: editing images, masks, the output --------------------------------


def _hw(size) -> tuple[int, int]:
  """(height, width) of a side or a (height, width) pair."""
  return (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))


def read_images(path: str, size, channels: int, what: str = "--init_image") -> np.ndarray:
  """(N, H, W, channels) float32 in [-1, 1] from an image file (N = 1) or an .npz with
  "images" (N, H, W, C) uint8 (what dit.sample writes); size: H = W, or (H, W). A missing,
  unreadable or wrong-size file is a one-line UserError naming it and the size expected
  (images are not resized)."""
  h, w = _hw(size)
  if not os.path.isfile(path):
    raise UserError(f"{what} {path!r} does not exist.")
  if path.endswith(".npz"):
    try:
      with np.load(path) as data:
        x = np.asarray(data["images"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      raise UserError(f"{what} {path!r} is not an .npz holding 'images' ({e}).") from e
    if x.ndim != 4 or x.shape[1:] != (h, w, channels):
      raise UserError(
        f"{what} {path!r} holds images of shape {x.shape[1:]}; this model takes "
        f"{h}x{w}x{channels} (H x W x C)."
      )
    return x.astype(np.float32) / 127.5 - 1.0
  if channels not in (1, 3):
    raise UserError(f"This model's images have {channels} channels: give {what} as an .npz.")
  x = _read_image(path, what, "L" if channels == 1 else "RGB")
  if x.shape[:2] != (h, w):
    raise UserError(
      f"{what} {path!r} is {x.shape[1]}x{x.shape[0]} pixels; this model takes {w}x{h} "
      "images: resize it first."
    )
  return x.reshape(1, h, w, channels).astype(np.float32) / 127.5 - 1.0


def _read_image(path: str, what: str, mode: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert(mode))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UserError(f"{what} {path!r} is not a readable image ({e}).") from e


def read_mask(path: str, size, factor: int = 1) -> np.ndarray:
  """An inpainting mask (1, H, W, 1) of 0/1 (size: H = W, or (H, W), in model space) from a
  greyscale image of (H, W) * factor pixels: white (>= 128) = keep the initial image, black
  = generate. With factor > 1 (a latent model: `factor` pixels per latent), a latent is kept
  only if all its pixels are."""
  h, w = _hw(size)
  x = _read_image(path, "--mask", "L")
  if x.shape != (h * factor, w * factor):
    raise UserError(
      f"--mask {path!r} is {x.shape[1]}x{x.shape[0]} pixels; it must be "
      f"{w * factor}x{h * factor}, the size of the model's images (white = keep, black = "
      "generate)."
    )
  keep = (x >= 128).reshape(h, factor, w, factor).min(axis=(1, 3))
  return keep.reshape(1, h, w, 1).astype(np.float32)


def prepare_output(path: str) -> str:
  """Checks before any sampling that `path` (.npz, or an image format PIL writes) can be
  written, creating its missing parent directories; returns it."""
  ext = os.path.splitext(path)[1].lower()
  if ext != ".npz" and Image.registered_extensions().get(ext) not in Image.SAVE:
    raise UserError(
      f"--out {path!r}: name an .npz (uint8 images) or an image file (.png, .jpg, ...), not "
      f"{ext or 'a name without an extension'}."
    )
  if os.path.isdir(path):
    raise UserError(f"--out {path!r} is a directory; name a file in it.")
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
    probe = os.path.join(parent, f".dit_write_test_{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--out {path!r} cannot be written ({parent}: {e.strerror}).") from e
  return path


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


GRID_BACKGROUND = 128  # Mid grey: cells stay apart whether images are dark or light.


def grid_image(
  images,
  nrow: int = 10,
  upscale: int | None = None,
  *,
  row_labels: Sequence[str] | None = None,
  caption: str = "",
) -> Image.Image:
  """(N, H, W, C) images in [-1, 1] as an RGB grid of `nrow` per row: cells upscaled
  (nearest) so that tiny images stay visible, separated by grey padding, with an optional
  label left of each row and a caption line below."""
  x = to_uint8(images)
  n, h, w, c = x.shape
  x = np.repeat(x, 3, axis=-1) if c == 1 else x[..., :3]
  upscale = upscale or max(1, 320 // (nrow * w))
  x = x.repeat(upscale, axis=1).repeat(upscale, axis=2)
  h, w = h * upscale, w * upscale
  pad = max(2, h // 16)
  rows = -(-n // nrow)
  font = ImageFont.load_default()
  labels = [str(v) for v in (row_labels or [])][:rows]
  left = max((int(font.getlength(s)) for s in labels), default=0)
  left = left + 2 * pad if labels else 0
  bottom = 14 + pad if caption else 0
  size = (left + pad + nrow * (w + pad), pad + rows * (h + pad) + bottom)
  canvas = Image.new("RGB", size, (GRID_BACKGROUND,) * 3)
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    r, col = divmod(i, nrow)
    canvas.paste(Image.fromarray(x[i]), (left + pad + col * (w + pad), pad + r * (h + pad)))
  for r, label in enumerate(labels):
    draw.text((pad, pad + r * (h + pad) + h // 2 - 5), label, fill=(255, 255, 255), font=font)
  if caption:
    draw.text((left + pad, size[1] - 14), caption, fill=(255, 255, 255), font=font)
  return canvas


def save_grid(
  images,
  path: str,
  nrow: int = 10,
  upscale: int | None = None,
  *,
  row_labels: Sequence[str] | None = None,
  caption: str = "",
) -> None:
  """Writes `grid_image(images, ...)` as a PNG."""
  grid_image(images, nrow, upscale, row_labels=row_labels, caption=caption).save(path)


def grid_caption(config: ml_collections.ConfigDict, settings=None, cfg_scale=None) -> str:
  """The caption "sampler, N steps, guidance W" of the settings (default: config.sample's)."""
  settings = settings or sampler_settings(config)
  scale = config.sample.cfg_scale if cfg_scale is None else cfg_scale
  return f"{settings.sampler}, {settings.steps} steps, guidance {float(scale):g}"


def grid_row_labels(config: ml_collections.ConfigDict) -> list[str] | None:
  """The label of each row of `class_grid`: the class index, or the digit prompt's digit."""
  rows = grid_rows(config)
  return [str(k) for k in range(rows)] if rows else None


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


# Model fields that change what trained params mean without changing their shapes.
_TRAINED_KEYS = ("input_size", "patch_size", "num_heads", "in_channels")


def check_trained_model(config: ml_collections.ConfigDict, workdir: str) -> None:
  """UserError if config.model differs from workdir/config.json's in a field the params'
  shapes do not show (the image size: position embeddings are not params), unless the model
  is conditioned on image sizes (trained on several, as PixArt-alpha)."""
  m = config.model
  if m.input_size % m.patch_size:
    raise UserError(
      f"config.model.input_size={m.input_size} is not a multiple of patch_size={m.patch_size}."
    )
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    trained = json.load(f).get("model", {})
  keys = [k for k in _TRAINED_KEYS if k in trained and k in m and trained[k] != m[k]]
  if m.get("size_conditioning", False):
    keys = [k for k in keys if k != "input_size"]
  if keys:
    changes = ", ".join(f"{k}={m[k]!r} (trained: {trained[k]!r})" for k in keys)
    raise UserError(
      f"config.model does not match the model in {path}: {changes}; this model makes "
      f"{trained.get('input_size')}x{trained.get('input_size')} images."
    )


def load_params(config: ml_collections.ConfigDict, workdir: str, use_ema: bool = True):
  """(model, params) of the newest readable checkpoint in `workdir` (EMA params by default).

  Reads checkpoints of dit.train and of `python -m dit.models.convert`; the params must have
  the shapes config.model gives and its image size must be the trained one (else a UserError
  lists the differences).
  """
  check_trained_model(config, workdir)
  try:
    model = dit_model.build_model(config.model)
    abstract = dit_model.abstract_params(model)
  except ValueError as e:
    raise UserError(f"Bad config.model: {e}") from e
  return model, checkpoint.restore_params(workdir, abstract, use_ema=use_ema)


def load(workdir: str, config: ml_collections.ConfigDict | None = None, use_ema: bool = True):
  """(config, model, params) of a workdir: its config.json (or `config`) and the EMA (or raw)
  params of its newest readable checkpoint."""
  config = checkpoint.read_config(workdir) if config is None else config
  model, params = load_params(config, workdir, use_ema=use_ema)
  return config, model, params
