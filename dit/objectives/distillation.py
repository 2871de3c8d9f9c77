"""The consistency-distillation (LCM) objective: a student learns the guided teacher's ODE.

The frozen input is the teacher's params (dit.distill loads and checks them); the target
network is the student's EMA (config.optim.ema_decay; LCM uses 0.95). Each example draws its
grid index, noise and guidance scale w ~ U[config.distill.guidance_min, guidance_max] from
its own key; the loss is `dit.diffusion.consistency.distillation_loss`. The student starts as
the teacher (`dit.distill.student_params`).
"""

from __future__ import annotations

import jax
import ml_collections

from dit import distill
from dit.diffusion import consistency, guidance, schedules
from dit.objectives.base import Apply, Objective, batch_cond, per_example


def make_objective(
  config: ml_collections.ConfigDict, apply: Apply, schedule: schedules.Schedule
) -> Objective:
  """The LCM objective of config.distill; loads the teacher of config.distill.teacher_workdir."""
  teacher_model, teacher = distill.load_teacher(config)
  return from_teacher(config, apply, schedule, teacher_model, teacher)


def from_teacher(
  config: ml_collections.ConfigDict,
  apply: Apply,
  schedule: schedules.Schedule,
  teacher_model,
  teacher: dict,
) -> Objective:
  """The LCM objective distilling `teacher_model` with params `teacher` (a frozen input)."""
  dc, prediction = config.distill, config.diffusion.prediction

  def loss(params, batch, frozen):
    x0, keys = batch["x0"], batch["keys"]
    index = per_example(keys, lambda k: jax.random.randint(k, (), 0, dc.num_ddim_timesteps), 0)
    noise = per_example(keys, lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype), 1)
    w = per_example(
      keys, lambda k: jax.random.uniform(k, (), minval=dc.guidance_min, maxval=dc.guidance_max), 2
    )
    cond = batch_cond(batch)
    student_cond = dict(cond, guidance=w)
    teacher_fn = guidance.cfg_denoise(
      lambda x, t, c: teacher_model.apply({"params": frozen["teacher"]}, x, t, c), cond, w
    )
    per_row, _ = consistency.distillation_loss(
      lambda x, t: apply(params, x, t, student_cond),
      teacher_fn,
      lambda x, t: apply(frozen["ema_params"], x, t, student_cond),
      x0,
      schedule,
      index=index,
      noise=noise,
      num_ddim_timesteps=dc.num_ddim_timesteps,
      prediction=prediction,
      solver=dc.solver,
      distance=dc.distance,
      huber_c=dc.huber_c,
      timestep_scaling=dc.timestep_scaling,
    )
    return per_row.mean(), {}

  return Objective(
    loss,
    frozen={"teacher": teacher},
    init_params=lambda fresh, frozen: distill.student_params(fresh, frozen["teacher"]),
  )
