"""The teacher of a consistency-distillation run (config.distill): loading and checking it.

A config with a `distill` section trains a latent consistency model (LCM) student with the
ordinary train loop (dit.train); the objective is dit.diffusion.consistency. The student is
the teacher's architecture with model.guidance_embedding=True, initialised from the
teacher's params (its new guidance embedder starts at zero, so the student starts as the
teacher). The EMA params (config.optim.ema_decay, LCM uses 0.95) are the target network.

  config.distill.teacher_workdir   a dit.train (or dit.models.convert) workdir
  config.distill.teacher_use_ema   distil the teacher's EMA params (default) or raw params
  config.distill.num_ddim_timesteps  N of the grid the teacher steps along (and the LCM
                                   sampler's lcm_original_steps)
  config.distill.solver            the teacher's ODE step: "ddim" (LCM) or "dpmpp_2s"
  config.distill.guidance_min/max  the guidance scale w ~ U[min, max] of each example
  config.distill.distance          "huber" (with huber_c) or "l2"
  config.distill.timestep_scaling  of the boundary conditions c_skip / c_out
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections

from dit import generate
from dit.cli import UserError, config_diffs
from dit.diffusion import consistency

# Model fields that may differ between teacher and student: how the same network is
# computed, not what it is.
COMPUTE_FIELDS = ("dtype", "remat", "remat_policy", "scan", "attention_impl", "guidance_embedding")


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is a consistency-distillation run."""
  return "distill" in config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for distill settings that cannot work, naming the value."""
  d = config.distill
  if "flow" in config or "diffusion" not in config:
    raise UserError(
      "Consistency distillation (config.distill) distils discrete-time diffusion models "
      "(a config.diffusion section); flow-matching models (config.flow) are not supported."
    )
  if not d.teacher_workdir:
    raise UserError(
      "config.distill.teacher_workdir is empty; set --config.distill.teacher_workdir=DIR to "
      "the teacher's training workdir."
    )
  if not config.model.get("guidance_embedding", False):
    raise UserError(
      "Consistency distillation needs config.model.guidance_embedding=True (the student "
      "is told the guidance scale it imitates)."
    )
  finite = math.isfinite(d.guidance_min) and math.isfinite(d.guidance_max)
  if not (finite and 0.0 < d.guidance_min <= d.guidance_max):
    raise UserError(
      f"config.distill.guidance_min/max must be finite with 0 < min <= max, got "
      f"{d.guidance_min}, {d.guidance_max}."
    )
  if not 1 <= d.num_ddim_timesteps <= config.diffusion.num_timesteps:
    raise UserError(
      f"config.distill.num_ddim_timesteps must be in [1, {config.diffusion.num_timesteps}], "
      f"got {d.num_ddim_timesteps}."
    )
  if d.distance not in consistency.DISTANCES:
    raise UserError(
      f"config.distill.distance must be one of {consistency.DISTANCES}, got {d.distance!r}."
    )
  if d.solver not in consistency.SOLVERS:
    raise UserError(
      f"config.distill.solver must be one of {consistency.SOLVERS}, got {d.solver!r}."
    )


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config.json of config.distill.teacher_workdir, checked against the student's.

  The model must be the same up to COMPUTE_FIELDS, and the diffusion section the same;
  otherwise a UserError names every differing field.
  """
  workdir = config.distill.teacher_workdir
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(
      f"config.distill.teacher_workdir={workdir!r} has no config.json; it must be the "
      "workdir of a dit.train or dit.models.convert run."
    )
  with open(path) as f:
    teacher = json.load(f)
  student = json.loads(config.to_json_best_effort())
  sections = ("model", "diffusion")
  ignore = [f"model.{key}" for key in COMPUTE_FIELDS]
  old = {s: teacher.get(s, {}) for s in sections}  # A missing section: every field differs.
  new = {s: student.get(s, {}) for s in sections}
  diffs = [
    f"{key}: teacher {a!r}, student {b!r}" for key, a, b in config_diffs(old, new, sections, ignore)
  ]
  if diffs:
    raise UserError(
      f"The teacher in {workdir} does not match the student's config; differing fields: "
      + "; ".join(diffs)
      + ". Use the teacher's model and diffusion settings (plus model.guidance_embedding=True)."
    )
  teacher = ml_collections.ConfigDict(teacher)
  # The teacher is run with the student's compute settings (dtype, attention backend).
  for key in COMPUTE_FIELDS:
    if key in teacher.model:
      teacher.model[key] = config.model.get(key)
  teacher.model.guidance_embedding = False
  return teacher


def load_teacher(config: ml_collections.ConfigDict) -> tuple[Any, dict]:
  """(teacher model, params) from config.distill.teacher_workdir's newest checkpoint."""
  tconfig = teacher_config(config)
  return generate.load_params(
    tconfig, config.distill.teacher_workdir, use_ema=config.distill.teacher_use_ema
  )


def student_params(fresh: dict, teacher: dict) -> dict:
  """The student's initial params: the teacher's, plus the student's new modules (fresh).

  fresh: the student's initialised params; teacher: params of the same architecture without
  the guidance embedder. Shapes must agree leaf by leaf.
  """
  extra = sorted(set(teacher) - set(fresh))
  if extra:
    raise UserError(f"The teacher has modules the student lacks: {extra}.")
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  mismatched = [k for k in teacher if shapes(teacher[k]) != shapes(fresh[k])]
  if mismatched:
    raise UserError(f"The teacher's params do not fit the student in modules {mismatched}.")
  return {**fresh, **teacher}
