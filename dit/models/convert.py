"""Public PyTorch DiT / PixArt / SD3 / Flux checkpoints -> Flax params for dit's models.

The layouts:
  convert_dit_checkpoint(path)    the official DiT release (`DiT-XL-2-256x256.pt`, or the same
                                  state dict saved as .safetensors): blocks.{i}.attn.qkv, ...
  convert_diffusers_dit(dir)      diffusers' DiTTransformer2DModel (facebook/DiT-XL-2-256).
  convert_pixart(dir)             diffusers' PixArtTransformer2DModel (PixArt-alpha / sigma).
  convert_sd3(dir)                diffusers' SD3Transformer2DModel (dit/models/mmdit.py).
  convert_flux(dir)               diffusers' FluxTransformer2DModel (dit/models/flux.py).
Each returns (params, model_kwargs): `build_model(model_kwargs).apply({"params": params}, ...)`
reproduces the PyTorch model. Every tensor is checked by name and shape first; a mismatch
raises a ValueError listing the missing, unexpected and mis-shaped keys.

The rule tables (which torch tensor goes where, and how) are dit/models/layouts.py's; the
exporter (dit/models/export.py, `--export=diffusers` below) reads the same tables backwards.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util
from tqdm import tqdm

from dit import checkpoint
from dit.models import hub_files, layouts
from dit.models.dit import DiT, abstract_params
from dit.models.layouts import (
  DIT_EMBEDDER,
  Rule,
  diffusers_dit_rules,
  dit_rules,
  pixart_rules,
  to_flax,
  torch_shape,
)
from dit.optim import make_optimizer

# DiT sizes whose head count cannot be read off the weights: hidden size -> heads.
_HEADS_BY_HIDDEN = {384: 6, 768: 12, 1024: 16, 1152: 16}


def _apply_rules(
  weights: Mapping[str, np.ndarray],
  rules: list[Rule],
  model_kwargs: dict,
  source: str,
  ignored: Mapping[str, tuple[int, ...]] | None = None,
  progress: bool = False,
  model=None,
) -> dict:
  """Checks names and shapes of `weights` against `rules`, then builds the Flax params
  (with a tqdm bar over the tensors if `progress`) of `model` (default DiT(**model_kwargs))."""
  model = DiT(**model_kwargs) if model is None else model
  flat_shapes = traverse_util.flatten_dict(abstract_params(model))
  shapes = {k: tuple(v.shape) for k, v in flat_shapes.items()}
  covered = {path for path, _, _ in rules}
  if covered != set(shapes):  # A bug in the rules, not in the checkpoint.
    raise AssertionError(f"rules do not cover the model: {sorted(set(shapes) ^ covered)}")
  expected = dict(ignored or {})
  for path, keys, kind in rules:
    for key in keys:
      expected[key] = torch_shape(kind, shapes[path], len(keys), model_kwargs["patch_size"])
  hub_files.check_keys(weights, expected, source)
  flat = {}
  for path, keys, kind in tqdm(rules, "convert", unit="tensor", disable=not progress):
    arrays = [np.asarray(weights[k], np.float32) for k in keys]
    flat[path] = to_flax(kind, arrays)
  return traverse_util.unflatten_dict(flat)


def _block_count(weights: Mapping[str, np.ndarray], pattern: str) -> int:
  ids = {int(m.group(1)) for k in weights if (m := re.match(pattern, k))}
  return max(ids) + 1 if ids else 0


# ----------------------------------------------------------------------------------------------
# Official DiT release (facebookresearch/DiT).


def _load_state_dict(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file at {path!r}.")
  if path.endswith(".safetensors"):
    stem = os.path.basename(path)[: -len(".safetensors")]
    return hub_files.read_safetensors(os.path.dirname(path) or ".", stem)
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"Reading the PyTorch pickle {path!r} needs torch (pip install 'dit[torch]'), "
      "or convert it to .safetensors first."
    ) from e
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(sd, dict) and "ema" in sd:  # A training checkpoint: use the EMA weights.
    sd = sd["ema"]
  elif isinstance(sd, dict) and "model" in sd:
    sd = sd["model"]
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def dit_params_from_state_dict(
  weights: Mapping[str, np.ndarray],
  source: str = "<state dict>",
  num_heads: int | None = None,
  *,
  progress: bool = False,
) -> tuple[dict, dict]:
  """Official DiT state dict (NumPy arrays) -> (params, model_kwargs)."""
  if "x_embedder.proj.weight" not in weights or "final_layer.linear.weight" not in weights:
    raise ValueError(
      f"Checkpoint {source} is not in the official DiT layout: it lacks x_embedder.proj.weight "
      f"or final_layer.linear.weight (first keys: {sorted(weights)[:8]})"
    )
  d, c, p, _ = weights["x_embedder.proj.weight"].shape
  out = weights["final_layer.linear.weight"].shape[0] // (p * p)
  table = weights.get("y_embedder.embedding_table.weight")
  pos = weights.get("pos_embed")
  grid = int(round(np.sqrt(pos.shape[1]))) if pos is not None else 256 // 8 // p
  kwargs = dict(
    input_size=grid * p,
    patch_size=p,
    in_channels=c,
    hidden_size=d,
    depth=_block_count(weights, r"blocks\.(\d+)\."),
    num_heads=num_heads or _HEADS_BY_HIDDEN.get(d, max(d // 64, 1)),
    num_classes=table.shape[0] - 1 if table is not None else 0,
    learn_sigma=out == 2 * c,
    block="adaln_zero",
  )
  # The fixed position table is recomputed by the model; only its shape is checked.
  ignored = {"pos_embed": (1, grid * grid, d)} if pos is not None else {}
  rules = dit_rules(kwargs["depth"], kwargs["num_classes"])
  return _apply_rules(weights, rules, kwargs, source, ignored, progress), kwargs


def convert_dit_checkpoint(
  path: str, num_heads: int | None = None, *, progress: bool = False
) -> tuple[dict, dict]:
  """Official DiT checkpoint (.pt via torch.load(weights_only=True), or .safetensors).

  Returns (params, model_kwargs). The head count is not stored in the weights; it defaults to
  the paper's (S: 6, B: 12, L: 16, XL: 16).
  """
  weights = _load_state_dict(path)
  return dit_params_from_state_dict(weights, repr(path), num_heads, progress=progress)


# ----------------------------------------------------------------------------------------------
# diffusers layouts.


def _diffusers_dir(model_dir: str) -> str:
  """A pipeline root holds the model in transformer/; accept either."""
  sub = os.path.join(model_dir, "transformer")
  if not os.path.isfile(os.path.join(model_dir, "config.json")) and os.path.isdir(sub):
    return sub
  return model_dir


def _check_supported(cfg: dict, source: str, expected: dict) -> None:
  for key, value in expected.items():
    if key in cfg and cfg[key] != value:
      raise ValueError(f"Unsupported {source} config {key}={cfg[key]!r}; expected {value!r}.")


def diffusers_dit_params(
  weights: Mapping[str, np.ndarray],
  cfg: dict,
  source: str = "<state dict>",
  *,
  progress: bool = False,
) -> tuple[dict, dict]:
  """diffusers DiTTransformer2DModel state dict + config -> (params, model_kwargs).

  diffusers keeps a copy of the timestep and label embedders in every block (all equal in the
  converted public checkpoints); block 0's is used and the others must match it.
  """
  _check_supported(
    cfg,
    source,
    {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True},
  )
  c = cfg.get("in_channels", 4)
  kwargs = dict(
    input_size=cfg.get("sample_size", 32),
    patch_size=cfg.get("patch_size", 2),
    in_channels=c,
    hidden_size=cfg.get("num_attention_heads", 16) * cfg.get("attention_head_dim", 72),
    depth=cfg.get("num_layers", 28),
    num_heads=cfg.get("num_attention_heads", 16),
    num_classes=cfg.get("num_embeds_ada_norm", 1000),
    learn_sigma=(cfg.get("out_channels") or c) == 2 * c,
    block="adaln_zero",
    time_freq_shift=1.0,  # diffusers' DiT uses Timesteps(downscale_freq_shift=1).
  )
  emb = DIT_EMBEDDER
  rules = diffusers_dit_rules(kwargs["depth"])
  # Per-block copies of the embedders: expected, checked equal to block 0's, then dropped.
  shared = [k for k in weights if k.startswith(emb.format(i=0) + ".")]
  ignored = {}
  for i in range(1, kwargs["depth"]):
    for k0 in shared:
      k = k0.replace(emb.format(i=0), emb.format(i=i), 1)
      ignored[k] = tuple(weights[k0].shape)
      if k in weights and weights[k].shape == weights[k0].shape:
        if not np.array_equal(weights[k], weights[k0]):
          raise ValueError(
            f"Checkpoint {source}: {k} differs from {k0}; this model shares one timestep/label "
            "embedder across blocks."
          )
  return _apply_rules(weights, rules, kwargs, source, ignored, progress), kwargs


def convert_diffusers_dit(model_dir: str, *, progress: bool = False) -> tuple[dict, dict]:
  """A diffusers DiT directory (config.json + diffusion_pytorch_model.safetensors)."""
  model_dir = _diffusers_dir(model_dir)
  cfg = hub_files.read_config(model_dir)
  weights = hub_files.read_safetensors(model_dir, "diffusion_pytorch_model")
  return diffusers_dit_params(weights, cfg, repr(model_dir), progress=progress)


def _pixart_kwargs(cfg: dict, source: str) -> dict:
  """DiT kwargs of a diffusers PixArtTransformer2DModel config (checked to be supported)."""
  _check_supported(
    cfg,
    source,
    {
      "norm_type": "ada_norm_single",
      "activation_fn": "gelu-approximate",
      "attention_bias": True,
      "attention_type": "default",
    },
  )
  c = cfg.get("in_channels", 4)
  sample_size = cfg.get("sample_size", 128)
  heads = cfg.get("num_attention_heads", 16)
  hidden = heads * cfg.get("attention_head_dim", 72)
  caption_channels = cfg.get("caption_channels") or 0
  if cfg.get("cross_attention_dim", hidden) not in (None, hidden) or not caption_channels:
    raise ValueError(
      f"Unsupported {source} config: needs caption_channels > 0 and cross_attention_dim = "
      f"hidden size {hidden}, got {caption_channels} and {cfg.get('cross_attention_dim')}"
    )
  interpolation = cfg.get("interpolation_scale")
  additional = cfg.get("use_additional_conditions")
  kwargs = dict(
    input_size=sample_size,
    patch_size=cfg.get("patch_size", 2),
    in_channels=c,
    hidden_size=hidden,
    depth=cfg.get("num_layers", 28),
    num_heads=heads,
    num_classes=0,
    learn_sigma=(cfg.get("out_channels") or c) == 2 * c,
    block="adaln_single",
    caption_channels=caption_channels,
    pe_interpolation=float(
      interpolation if interpolation is not None else max(sample_size // 64, 1)
    ),
    size_conditioning=bool(additional if additional is not None else sample_size == 128),
  )
  return kwargs


def pixart_params(
  weights: Mapping[str, np.ndarray],
  cfg: dict,
  source: str = "<state dict>",
  null_caption: np.ndarray | None = None,
  *,
  progress: bool = False,
) -> tuple[dict, dict]:
  """diffusers PixArtTransformer2DModel state dict + config -> (params, model_kwargs).

  diffusers stores no null caption (its pipelines encode an empty negative prompt instead).
  Pass `null_caption` (L, caption_channels), e.g. T5 embeddings of "", to get a learned
  `y_embedding` param that `cond["drop"]` will use; without it the model gets
  null_caption="frozen" (a fixed random table), so pass the negative prompt as "text".
  """
  kwargs = _pixart_kwargs(cfg, source)
  caption_channels = kwargs["caption_channels"]
  if null_caption is not None:
    null_caption = np.asarray(null_caption, np.float32)
    if null_caption.ndim != 2 or null_caption.shape[1] != caption_channels:
      raise ValueError(
        f"null_caption must be (L, {caption_channels}), got shape {null_caption.shape}"
      )
    kwargs.update(caption_length=null_caption.shape[0], null_caption="learned")
    weights = {**weights, "y_embedding": null_caption}
  else:
    kwargs.update(null_caption="frozen")

  learned = null_caption is not None
  rules = pixart_rules(kwargs["depth"], kwargs["size_conditioning"], learned_null=learned)
  return _apply_rules(weights, rules, kwargs, source, progress=progress), kwargs


def convert_pixart(
  model_dir: str, null_caption: np.ndarray | None = None, *, progress: bool = False
) -> tuple[dict, dict]:
  """A diffusers PixArt-alpha/sigma transformer directory (or pipeline root).

  Returns (params, model_kwargs); see `pixart_params` for `null_caption`.
  """
  model_dir = _diffusers_dir(model_dir)
  cfg = hub_files.read_config(model_dir)
  weights = hub_files.read_safetensors(model_dir, "diffusion_pytorch_model")
  return pixart_params(weights, cfg, repr(model_dir), null_caption, progress=progress)


def convert_flux(
  model_dir: str, *, input_size: int = 128, caption_length: int = 512, progress: bool = False
) -> tuple[dict, dict]:
  """A diffusers FluxTransformer2DModel directory (or pipeline root) -> (params, Flux kwargs).

  The rules are dit/models/flux.py's (`diffusers_params`, which documents the arguments).
  """
  from dit.models import flux

  model_dir = _diffusers_dir(model_dir)
  cfg = hub_files.read_config(model_dir)
  weights = hub_files.read_safetensors(model_dir, "diffusion_pytorch_model")
  return flux.diffusers_params(
    weights, cfg, repr(model_dir), input_size=input_size, caption_length=caption_length,
    progress=progress,
  )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# diffusers SD3Transformer2DModel (Stable Diffusion 3's MMDiT) -> dit.models.mmdit.MMDiT.

# SD3's pipeline: 77 CLIP tokens (CLIP-L and CLIP-G, side by side, zero-padded to T5's width)
# then 256 T5 tokens. Only the length of a text-free call's (zero) null caption.
SD3_CAPTION_LENGTH = 77 + 256


def _sd3_kwargs(cfg: dict, source: str) -> dict:
  """MMDiT kwargs (with arch="mmdit") of a diffusers SD3Transformer2DModel config, checked."""
  from dit.models.mmdit import QK_NORMS

  if cfg.get("dual_attention_layers"):
    raise ValueError(
      f"Unsupported {source} config dual_attention_layers={list(cfg['dual_attention_layers'])}: "
      "SD3.5's dual attention (attn2) is not implemented; only SD3-style blocks "
      "(dual_attention_layers=[]) convert"
    )
  heads, head_dim = cfg.get("num_attention_heads", 18), cfg.get("attention_head_dim", 64)
  hidden, c = heads * head_dim, cfg.get("in_channels", 16)
  out = cfg.get("out_channels") or c
  qk_norm = cfg.get("qk_norm") or ""
  checks = {
    "caption_projection_dim": (cfg.get("caption_projection_dim", 1152) == hidden, hidden),
    "out_channels": (out in (c, 2 * c), f"in_channels={c} or twice that"),
    "qk_norm": (qk_norm in QK_NORMS, "null, 'rms_norm' or 'layer_norm'"),
    "pooled_projection_dim": (cfg.get("pooled_projection_dim", 2048) > 0, "> 0"),
  }
  for key, (ok, expected) in checks.items():
    if not ok:
      raise ValueError(f"Unsupported {source} config {key}={cfg.get(key)!r}; expected {expected}.")
  return dict(
    arch="mmdit",
    input_size=cfg.get("sample_size", 128),
    patch_size=cfg.get("patch_size", 2),
    in_channels=c,
    hidden_size=hidden,
    depth=cfg.get("num_layers", 18),
    num_heads=heads,
    mlp_ratio=4.0,
    num_classes=0,
    learn_sigma=out == 2 * c,
    caption_channels=cfg.get("joint_attention_dim", 4096),
    caption_length=SD3_CAPTION_LENGTH,
    pooled_channels=cfg.get("pooled_projection_dim", 2048),
    null_caption="zeros",  # SD3 trains its dropped captions as zero embeddings.
    attend_padding=True,  # SD3 attends to its padded text sequence, padding included.
    pos_embed_max_size=cfg.get("pos_embed_max_size") or 0,  # None: diffusers' uncropped table.
    pe_interpolation=1.0,
    qk_norm=qk_norm,
  )


def sd3_params(
  weights: Mapping[str, np.ndarray],
  cfg: dict,
  source: str = "<state dict>",
  *,
  progress: bool = False,
) -> tuple[dict, dict]:
  """diffusers SD3Transformer2DModel state dict + config -> (params, model_kwargs).

  `dit.models.mmdit.build_model(kwargs without arch)` reproduces it: cond["text"] is its
  encoder_hidden_states, cond["pooled"] its pooled_projections, t its timestep (1000 sigma).
  The last block's text-query tensors (which compute nothing) are checked and dropped; the
  stored position table must be the one MMDiT computes.
  """
  from dit.models import mmdit

  kwargs = _sd3_kwargs(cfg, source)
  model = mmdit.build_model({k: v for k, v in kwargs.items() if k != "arch"})
  d, depth, qk_norm = model.hidden_size, model.depth, model.qk_norm
  ignored = layouts.sd3_unused(depth, qk_norm, d, d // model.num_heads)
  m = model.pos_embed_max_size or model.input_size // model.patch_size
  if "pos_embed.pos_embed" in weights:  # A buffer, persistent when pos_embed_max_size is set.
    ignored["pos_embed.pos_embed"] = (1, m * m, d)
  rules = layouts.sd3_rules(depth, qk_norm)
  params = _apply_rules(weights, rules, kwargs, source, ignored, progress, model=model)
  if "pos_embed.pos_embed" in weights:
    diff = np.abs(weights["pos_embed.pos_embed"][0] - model._pos_embed(m, m)).max()
    if diff > 1e-4:
      raise ValueError(
        f"Checkpoint {source}: pos_embed.pos_embed differs from SD3's sin-cos table for "
        f"sample_size={model.input_size}, patch_size={model.patch_size} (max abs diff {diff:.3g})"
      )
  return params, kwargs


def convert_sd3(model_dir: str, *, progress: bool = False) -> tuple[dict, dict]:
  """A diffusers SD3 transformer directory (or pipeline root) -> (params, MMDiT kwargs)."""
  model_dir = _diffusers_dir(model_dir)
  cfg = hub_files.read_config(model_dir)
  weights = hub_files.read_safetensors(model_dir, "diffusion_pytorch_model")
  return sd3_params(weights, cfg, repr(model_dir), progress=progress)


# ----------------------------------------------------------------------------------------------
# Command line: a public checkpoint -> an Orbax checkpoint + config.json that dit.sample reads.
#
#   python -m dit.models.convert --kind=dit --source=DiT-XL-2-256x256.pt --workdir=runs/dit_xl \
#       [--vae=/models/sd-vae-ft-ema]
#   python -m dit.models.convert --kind=pixart --source=/models/PixArt-XL-2-512x512 \
#       --workdir=runs/pixart [--t5=/models/t5-v1_1-xxl --vae=/models/sd-vae-ft-ema]
#   python -m dit.sample --workdir=runs/dit_xl --labels=207,360 --num=8

#   python -m dit.models.convert --kind=sit --source=SiT-XL-2-256x256.pt --workdir=runs/sit_xl
#   python -m dit.models.convert --kind=flux --source=/models/FLUX.1-dev --workdir=runs/flux \
#       [--input_size=128 --caption_length=512]   # dit/models/flux.py, docs/flux.md
#
# And back out (dit/models/export.py, docs/export.md): a workdir -> a diffusers directory.
#   python -m dit.models.convert --export=diffusers --workdir=runs/digits --out=digits_diffusers

# "sit": SiT's checkpoints are in DiT's layout; the config (configs/imagenet256_sit.py) makes
# them flow-matching models with SiT's time convention.
KINDS = ("dit", "sit", "diffusers_dit", "pixart", "flux", "sd3")
# The config each kind's settings start from (model fields are then replaced by the weights').
_BASE_CONFIGS = {
  "dit": "imagenet256_dit.py",
  "sit": "imagenet256_sit.py",
  "diffusers_dit": "imagenet256_dit.py",
  "pixart": "t2i_pixart.py",
  "flux": "t2i_flux.py",
  "sd3": "t2i_mmdit.py:sd3",  # Flow matching with SD3's shift and sampler settings.
}


def _default_config_path(kind: str) -> str:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(root, "configs", _BASE_CONFIGS[kind])


def converted_config(base, model_kwargs: dict, *, t5: str = "", vae: str = ""):
  """`base` (a ConfigDict) with config.model from the checkpoint and the model directories set.

  Returns a new locked ConfigDict (no field references: what config.json holds).
  """
  import json

  import ml_collections

  d = json.loads(base.to_json_best_effort())
  d["model"].update(model_kwargs)
  m = d["model"]
  d.setdefault("data", {}).update(
    resolution=m["input_size"], channels=m["in_channels"], num_classes=m["num_classes"]
  )
  d["vae"] = {"path": vae}
  if m.get("caption_channels", 0):
    text = dict(d.get("text", {}))
    text.update(t5_path=t5, max_length=m.get("caption_length", 120))
    d["text"] = d["data"]["text"] = text
    d["data"]["max_text_length"] = text["max_length"]
    d.setdefault("sample", {})["prompt_template"] = ""  # Real text models need --prompt.
  config = ml_collections.ConfigDict(d)
  config.lock()
  return config


def write_checkpoint(params: dict, config, workdir: str) -> str:
  """Writes `params` as step 0 of a dit.train run in `workdir` (Orbax ckpt/ + config.json).

  The state is what dit.train starts from: EMA = params, a fresh optimizer state of
  config.optim. Returns the absolute workdir.
  """
  tx, _ = make_optimizer(config)
  return checkpoint.write_params(params, config, tx, workdir)


def _null_caption(t5: str, length: int) -> np.ndarray:
  """T5 embeddings of the empty prompt, (length, D): PixArt's negative prompt."""
  from dit.models.t5 import TextEncoder

  emb, _ = TextEncoder.from_pretrained(t5, max_length=length).encode([""])
  return np.asarray(emb[0], np.float32)


def main(argv: list[str]) -> None:
  del argv
  from absl import flags

  from dit.cli import UserError, load_config

  f = flags.FLAGS
  if f.export:
    return _export(f)
  if not f.source or not f.workdir or f.kind not in KINDS:
    raise UserError(f"--source, --workdir and --kind (one of {KINDS}) are required.")
  try:
    if f.kind in ("dit", "sit"):
      params, kwargs = convert_dit_checkpoint(f.source, f.num_heads, progress=f.progress)
    elif f.kind == "diffusers_dit":
      params, kwargs = convert_diffusers_dit(f.source, progress=f.progress)
    elif f.kind == "sd3":
      params, kwargs = convert_sd3(f.source, progress=f.progress)
    elif f.kind == "flux":  # T5 tokens per prompt: 512 ([dev]) unless --caption_length.
      length = f.caption_length if f["caption_length"].present else 512
      params, kwargs = convert_flux(
        f.source, input_size=f.input_size, caption_length=length, progress=f.progress
      )
    else:
      null = _null_caption(f.t5, f.caption_length) if f.t5 else None
      params, kwargs = convert_pixart(f.source, null_caption=null, progress=f.progress)
  except (FileNotFoundError, ValueError, ImportError) as e:
    raise UserError(str(e)) from e
  base = load_config(f.config or _default_config_path(f.kind))
  config = converted_config(base, kwargs, t5=f.t5 or "", vae=f.vae or "")
  workdir = write_checkpoint(params, config, f.workdir)
  print(f"wrote {workdir}/ckpt and {workdir}/config.json ({f.kind}: {kwargs})")


def _export(f) -> None:
  """--export=diffusers: the workdir's EMA (or raw) params -> a diffusers directory."""
  import sys
  import warnings

  from dit.cli import UserError
  from dit.models import export

  if not f.workdir or not f.out:
    raise UserError("--export=diffusers needs --workdir (a dit.train or convert run) and --out.")
  if f.source or f.kind:
    raise UserError("--source and --kind are for importing; --export reads --workdir.")
  if not os.path.isfile(os.path.join(f.workdir, "config.json")):
    raise UserError(f"--workdir {f.workdir!r} has no config.json: not a dit.train or convert run.")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Printed below, as one line each.
    try:
      summary = export.export_workdir(
        f.workdir, f.out, use_ema=not f.raw_params, progress=f.progress
      )
    except ValueError as e:
      raise UserError(str(e)) from e
  for note in summary["warnings"]:
    print(f"warning: {note}", file=sys.stderr)
  params = "raw" if f.raw_params else "EMA"
  print(
    f"wrote {summary['out']}: {summary['model']} ({summary['tensors']} tensors, {params} "
    f"params of {f.workdir}) + scheduler/ ({summary['scheduler']})"
  )


def define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("source", None, "Checkpoint file (.pt / .safetensors) or directory.")
  flags.DEFINE_enum("kind", None, list(KINDS), "Checkpoint layout.")
  flags.DEFINE_string(
    "workdir", None, "Import: output ckpt/ and config.json, as dit.train writes; export: input."
  )
  flags.DEFINE_string("config", None, "Base config file[:arg]; default by --kind.")
  flags.DEFINE_string("t5", None, "T5 directory: config.text.t5_path, PixArt's null caption.")
  flags.DEFINE_string("vae", None, "VAE directory for config.vae.path.")
  flags.DEFINE_integer("num_heads", None, "Heads of an official DiT (default by width).")
  flags.DEFINE_integer("caption_length", 120, "PixArt tokens per caption (120 alpha, 300 sigma).")
  flags.DEFINE_integer("input_size", 128, "Flux: latent side of the config (128 = 1024 px).")
  flags.DEFINE_enum(
    "export", None, ["diffusers"], "Export --workdir instead: a diffusers model directory."
  )
  flags.DEFINE_string("out", None, "Export: the output directory (docs/export.md).")
  flags.DEFINE_bool("raw_params", False, "Export the raw params instead of the EMA params.")
  flags.DEFINE_bool("progress", True, "tqdm progress bars (--progress=false for logs).")


def cli() -> None:
  """Console-script-style entry point."""
  from dit.cli import run_command

  define_flags()
  run_command(main)


def export_cli() -> None:
  """dit-export: `python -m dit.models.convert --export=diffusers` (docs/export.md)."""
  from absl import flags

  from dit.cli import run_command

  define_flags()
  flags.FLAGS.set_default("export", "diffusers")
  run_command(main)


if __name__ == "__main__":
  cli()
