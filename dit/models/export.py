"""dit params -> a diffusers model directory: the inverse of dit.models.convert.

  python -m dit.models.convert --export=diffusers --workdir=runs/digits --out=digits_diffusers
  dit-export --workdir=runs/digits --out=digits_diffusers [--raw_params] [--progress=false]

`export_workdir` writes a workdir's EMA (or raw) params as what diffusers' `save_pretrained`
writes, plus the scheduler the model was trained with:

  OUT/config.json                           DiTTransformer2DModel (block adaln_zero) or
  OUT/diffusion_pytorch_model.safetensors   PixArtTransformer2DModel (block adaln_single)
  OUT/scheduler/scheduler_config.json       config.sample.sampler's diffusers scheduler with
                                            the training schedule (betas, T, prediction type),
                                            or FlowMatchEulerDiscreteScheduler (shift) for a
                                            flow-matching config
  OUT/null_caption.npy                      PixArt: the null caption (L, caption_channels),
                                            diffusers' negative_prompt_embeds for guidance

No torch needed: the tensors are the rule tables of dit/models/layouts.py read backwards
(`layouts.to_torch`) and written with safetensors.numpy. diffusers' DiT keeps one timestep
and label embedder per block; the shared one is written into every block.

Models diffusers cannot represent are refused with a ValueError naming the config field
(`check_exportable`): among them every block option but the defaults (norm="rmsnorm",
mlp="swiglu", pos_embed="rope"/"both", any qk_norm). One difference is only warned about:
diffusers' DiT computes its timestep sinusoid with downscale_freq_shift=1, the original DiT
(and dit's default, model.time_freq_shift=0) with 0. The weights are the same;
`match_time_freq_shift` sets the loaded diffusers model to this model's sinusoid for exact
parity.
"""

from __future__ import annotations

import json
import os
import warnings

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file
from tqdm import tqdm

from dit import checkpoint
from dit.diffusion import flow as flow_lib
from dit.diffusion import samplers, schedules
from dit.models import layouts
from dit.models.attention import qk_norm_kind
from dit.models.dit import DiT, abstract_params, build_model
from dit.models.layers import scale_shift_init

# The diffusers release whose save_pretrained output this reproduces (tests/test_export.py).
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS = "diffusion_pytorch_model.safetensors"
NULL_CAPTION = "null_caption.npy"
# block -> the diffusers model class and the downscale_freq_shift of its timestep sinusoid.
MODELS = {
  "adaln_zero": ("DiTTransformer2DModel", 1.0),
  "adaln_single": ("PixArtTransformer2DModel", 0.0),
}
# Fields every exported model must have, with what diffusers' blocks do instead (qk_norm is
# compared as its QK_NORMS name: False and "" are both no norm).
_FIXED = {
  "qk_norm": ("", "its attention has no query/key norm"),
  "guidance_embedding": (False, "it has no guidance-scale embedding (a distilled LCM student)"),
  "mlp_ratio": (4.0, "its feed-forward is 4x the hidden size"),
  "norm": ("layernorm", "its blocks' norms are LayerNorms without scale or bias"),
  "mlp": ("gelu", "its feed-forward is Linear -> GELU(tanh) -> Linear"),
  "pos_embed": ("sincos", "its positions are the absolute sin-cos table only, no RoPE"),
}


def _refuse(field: str, value, why: str) -> ValueError:
  return ValueError(f"Cannot export to diffusers: config.model.{field}={value!r} ({why}).")


def check_exportable(model: DiT) -> list[str]:
  """Raises a one-line ValueError naming the config.model field diffusers cannot represent;
  returns warnings (differences the exported model can be patched for after loading)."""
  if not isinstance(model, DiT):
    raise _refuse("arch", type(model).__name__.lower(), "only DiT and PixArt models export")
  if model.block not in MODELS:
    why = f"diffusers has no such block; exportable: {', '.join(MODELS)}"
    raise _refuse("block", model.block, why)
  cls, shift = MODELS[model.block]
  for field, (value, why) in _FIXED.items():
    have = qk_norm_kind(model.qk_norm) if field == "qk_norm" else getattr(model, field)
    if have != value:
      raise _refuse(field, getattr(model, field), f"{cls}: {why}")
  if model.block == "adaln_zero":
    checks = {
      "num_classes": (model.num_classes > 0, "a class-conditional model with num_classes > 0"),
      "caption_channels": (model.caption_channels == 0, "no text cross-attention"),
      "size_conditioning": (not model.size_conditioning, "no size micro-conditioning"),
      "pe_interpolation": (model.pe_interpolation == 1.0, "position embeddings at scale 1"),
    }
  else:
    checks = {
      "caption_channels": (model.caption_channels > 0, "a text model, caption_channels > 0"),
      "num_classes": (model.num_classes == 0, "no class labels"),
    }
  for field, (ok, needs) in checks.items():
    if not ok:
      raise _refuse(field, getattr(model, field), f"diffusers' {cls} needs {needs}")
  if model.time_freq_shift != shift:
    return [
      f"config.model.time_freq_shift={model.time_freq_shift:g}, but diffusers' {cls} uses "
      f"downscale_freq_shift={shift:g} in its timestep sinusoid, so its outputs differ; after "
      f"loading, call dit.models.export.match_time_freq_shift(model, {model.time_freq_shift:g})"
    ]
  return []


def transformer_config(model: DiT) -> dict:
  """The diffusers config.json of `model` (every argument, as save_pretrained writes it)."""
  cls, _ = MODELS[model.block]
  config = {
    "_class_name": cls,
    "_diffusers_version": DIFFUSERS_VERSION,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": model.hidden_size // model.num_heads,
    "dropout": 0.0,
    "in_channels": model.in_channels,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,  # dit's LayerNorms (as the original DiT's); diffusers' DiT default is 1e-5.
    "norm_num_groups": 32,
    "num_attention_heads": model.num_heads,
    "num_layers": model.depth,
    "out_channels": model.out_channels,
    "patch_size": model.patch_size,
    "sample_size": model.input_size,
    "upcast_attention": False,
  }
  if model.block == "adaln_zero":
    config.update(norm_type="ada_norm_zero", num_embeds_ada_norm=model.num_classes)
  else:
    config.update(
      norm_type="ada_norm_single",
      num_embeds_ada_norm=1000,  # Unused by PixArt, but it must not be None.
      attention_type="default",
      caption_channels=model.caption_channels,
      cross_attention_dim=model.hidden_size,
      interpolation_scale=model.pe_interpolation,
      use_additional_conditions=model.size_conditioning,
    )
  return dict(sorted(config.items()))


def _rules(model: DiT) -> list[layouts.Rule]:
  if model.block == "adaln_zero":
    return layouts.diffusers_dit_rules(model.depth)
  learned = model.null_caption == "learned"  # y_embedding goes to null_caption.npy instead.
  rules = layouts.pixart_rules(model.depth, model.size_conditioning, learned_null=learned)
  return [r for r in rules if r[0] != ("y_embedding",)]


def state_dict(params: dict, model: DiT, progress: bool = False) -> dict[str, np.ndarray]:
  """The diffusers state dict (float32 NumPy arrays) of `params`, a param tree of `model`."""
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  shapes = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_params(model)).items()}
  wrong = sorted(set(flat) ^ set(shapes)) or sorted(k for k in flat if flat[k].shape != shapes[k])
  if wrong:  # restore_params checks this for workdirs; this is the library path.
    raise ValueError(f"params do not fit config.model: {['/'.join(k) for k in wrong[:5]]}")
  out = {}
  for path, keys, kind in tqdm(_rules(model), "export", unit="tensor", disable=not progress):
    parts = layouts.to_torch(kind, np.asarray(flat[path], np.float32), len(keys), model.patch_size)
    out.update(zip(keys, parts, strict=True))
  if model.block == "adaln_zero":  # diffusers' per-block copies of the shared embedder.
    first = layouts.DIT_EMBEDDER.format(i=0)
    for key in [k for k in out if k.startswith(first + ".")]:
      for i in range(1, model.depth):
        out[key.replace(first, layouts.DIT_EMBEDDER.format(i=i), 1)] = out[key]
  return out


def null_caption(params: dict, model: DiT) -> np.ndarray:
  """A PixArt model's null caption (caption_length, caption_channels): learned or frozen."""
  if model.null_caption == "learned":
    return np.asarray(params["y_embedding"], np.float32)
  shape = (model.caption_length, model.caption_channels)  # As DiT._caption draws it.
  return np.asarray(scale_shift_init(jax.random.key(0), shape), np.float32)


# ---- The scheduler ---------------------------------------------------------------------------

_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# dit sampler -> (diffusers scheduler, its settings), as dit.diffusion.samplers' SAMPLERS say.
_DPM = "DPMSolverMultistepScheduler"
SCHEDULERS = {
  "ddpm": ("DDPMScheduler", {}),
  "ddim": ("DDIMScheduler", {}),
  "euler": ("EulerDiscreteScheduler", {}),
  "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
  "heun": ("HeunDiscreteScheduler", {}),
  "dpmpp_2m": (_DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
  "dpmpp_2m_sde": (_DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
  "dpmpp_3m": (_DPM, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
  "unipc": ("UniPCMultistepScheduler", {}),
  "lcm": ("LCMScheduler", {}),
}
# The optional settings each scheduler takes (diffusers 0.42's __init__ arguments).
_TAKES = {
  "clip_sample": {"DDPMScheduler", "DDIMScheduler", "HeunDiscreteScheduler", "LCMScheduler"},
  "set_alpha_to_one": {"DDIMScheduler", "LCMScheduler"},
  "use_karras_sigmas": {
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    _DPM,
    "UniPCMultistepScheduler",
  },
  "rescale_betas_zero_snr": {c for c, _ in SCHEDULERS.values()} - {"HeunDiscreteScheduler"},
}


def _betas(d) -> dict:
  """The beta schedule of config.diffusion by diffusers' name, or as trained_betas."""
  f = {k: d.get(k, v) for k, v in schedules.SCHEDULE_FIELDS.items()}
  out = {"beta_start": f["beta_start"], "beta_end": f["beta_end"]}
  cosine = f["schedule"] == "cosine" and (f["cosine_s"], f["max_beta"]) == (0.008, 0.999)
  if f["schedule"] in ("linear", "scaled_linear"):
    return {**out, "beta_schedule": f["schedule"]}
  if cosine:  # diffusers' betas_for_alpha_bar is the same formula.
    return {**out, "beta_schedule": "squaredcos_cap_v2"}
  kw = dict(cosine_s=f["cosine_s"], max_beta=f["max_beta"])
  betas = schedules.beta_schedule(f["schedule"], f["num_timesteps"], **out, **kw)
  return {**out, "beta_schedule": "linear", "trained_betas": betas.tolist()}


def _flow_scheduler(config) -> dict:
  flow = flow_lib.from_config(config)  # dynamic_shift resolves to this resolution's shift.
  for field, value in (("interpolant", "linear"), ("target", "velocity"), ("reverse_time", False)):
    if getattr(flow, field) != value:
      raise ValueError(
        f"Cannot export to diffusers: config.flow.{field}={getattr(flow, field)!r} "
        f"(FlowMatchEulerDiscreteScheduler needs {value!r})."
      )
  if not float(flow.time_scale).is_integer():
    raise ValueError(
      f"Cannot export to diffusers: config.flow.time_scale={flow.time_scale!r} (diffusers' "
      "model time is sigma * num_train_timesteps, an integer)."
    )
  return {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": int(flow.time_scale),
    "shift": float(flow.shift),
    "use_dynamic_shifting": False,
  }


def scheduler_config(config) -> dict:
  """The diffusers scheduler_config.json of `config`: config.sample.sampler's scheduler with
  config.diffusion's schedule and prediction, or FlowMatchEuler for a flow config."""
  if flow_lib.is_flow(config):
    out = _flow_scheduler(config)
  else:
    d, s = config.diffusion, samplers.SamplerSettings.from_config(config)
    cls, extra = SCHEDULERS[s.sampler]
    out = {
      "_class_name": cls,
      "num_train_timesteps": d.num_timesteps,
      **_betas(d),
      "prediction_type": _PREDICTIONS[d.prediction],
      "timestep_spacing": s.timestep_spacing,
      "steps_offset": s.steps_offset,
      **extra,
    }
    if d.get("zero_terminal_snr", False):
      if cls not in _TAKES["rescale_betas_zero_snr"]:
        raise ValueError(
          f"Cannot export to diffusers: config.diffusion.zero_terminal_snr=True ({cls}, the "
          f"scheduler of config.sample.sampler={s.sampler!r}, cannot rescale its betas)."
        )
      out["rescale_betas_zero_snr"] = True
    wanted = {
      "clip_sample": s.clip_x0 is not None,  # diffusers clips by default; dit does not.
      "set_alpha_to_one": s.set_alpha_to_one,
      "use_karras_sigmas": s.karras,
    }
    out.update({k: v for k, v in wanted.items() if cls in _TAKES[k]})
    if s.clip_x0 is not None and cls in _TAKES["clip_sample"]:
      out["clip_sample_range"] = float(s.clip_x0)
    if cls == "DDPMScheduler":  # DiTPipeline drops learned variances before the scheduler.
      out["variance_type"] = "fixed_large" if s.variance == "fixed_large" else "fixed_small"
    if cls == "LCMScheduler":
      out["original_inference_steps"] = s.lcm_original_steps
  return {"_class_name": out.pop("_class_name"), "_diffusers_version": DIFFUSERS_VERSION, **out}


# ---- Writing ---------------------------------------------------------------------------------


def _write_json(path: str, value: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")  # As diffusers writes it.


def export_diffusers(params: dict, config, out: str, progress: bool = False) -> dict:
  """Writes `params` of the model of `config` (config.model and the diffusion or flow
  section) to the diffusers directory `out`; returns a summary (classes, files, warnings).

  Raises ValueError naming the field of a model or schedule diffusers cannot represent.
  """
  model = build_model(config.model)
  notes = check_exportable(model)
  scheduler = scheduler_config(config)  # Refuses before anything is written.
  tensors = state_dict(params, model, progress)
  os.makedirs(out, exist_ok=True)
  files = ["config.json", WEIGHTS, "scheduler/scheduler_config.json"]
  _write_json(os.path.join(out, files[0]), transformer_config(model))
  save_file(tensors, os.path.join(out, WEIGHTS), metadata={"format": "pt"})
  _write_json(os.path.join(out, files[2]), scheduler)
  if model.block == "adaln_single":
    np.save(os.path.join(out, NULL_CAPTION), null_caption(params, model))
    files.append(NULL_CAPTION)
  for note in notes:
    warnings.warn(note, stacklevel=2)
  return {
    "out": os.path.abspath(out),
    "model": MODELS[model.block][0],
    "scheduler": scheduler["_class_name"],
    "tensors": len(tensors),
    "files": files,
    "warnings": notes,
  }


def export_workdir(workdir: str, out: str, use_ema: bool = True, progress: bool = False) -> dict:
  """Exports the newest readable checkpoint of a dit.train (or dit.models.convert) workdir:
  its EMA params (or raw, use_ema=False) with its config.json. See `export_diffusers`."""
  config = checkpoint.read_config(workdir)
  model = build_model(config.model)
  check_exportable(model)  # Before the (possibly long) restore.
  scheduler_config(config)
  params = checkpoint.restore_params(workdir, abstract_params(model), use_ema=use_ema)
  return export_diffusers(params, config, out, progress)


def match_time_freq_shift(transformer, shift: float) -> None:
  """Sets a loaded diffusers DiT / PixArt model's timestep sinusoid to dit's time_freq_shift
  (its `downscale_freq_shift`), so that it computes exactly what the dit model computes."""
  if hasattr(transformer, "adaln_single"):  # PixArt: one shared embedder.
    transformer.adaln_single.emb.time_proj.downscale_freq_shift = shift
  for block in getattr(transformer, "transformer_blocks", []):
    emb = getattr(block.norm1, "emb", None)  # DiT: one embedder per block.
    if emb is not None:
      emb.time_proj.downscale_freq_shift = shift
