"""Consistency distillation (latent consistency models, Luo et al. 2023; Song et al. 2023).

A student f(x_t, t, w) is trained to map every point of the teacher's guided probability-flow
ODE trajectory to the same clean sample. The trajectory is discretised on the DDIM grid of
N = `num_ddim_timesteps` points, t_n = (n + 1) * (T // N) - 1 (the grid the LCM sampler
uses). One training example:

  t  = t_n,  s = t_n - T // N (0 for n = 0),  w ~ U[w_min, w_max]  (guidance scale)
  x_t   = alpha_t x0 + sigma_t eps
  x_s   = one step of the teacher's ODE with classifier-free guidance w, from t to s: DDIM
          (as LCM) or DPM-Solver++(2S) (second order, a midpoint in log-SNR; 2 teacher calls)
  pred  = f_theta(x_t, t, w),   target = stopgrad(f_theta-(x_s, s, w))   (theta-: EMA target)
  loss  = d(pred, target), Huber sqrt(|.|^2 + c^2) - c or squared L2, mean over elements.

The consistency function is f(x, t) = c_skip(t) x + c_out(t) x0_model(x, t) with the
boundary conditions c_skip(0) = 1 and c_out(0) = 0, so f is the identity at t = 0 (LCM's
parameterisation: c(t) of the timestep scaled by `timestep_scaling`, sigma_data = 0.5).
Guidance scales use the convention of dit.diffusion.guidance: uncond + w (cond - uncond).
The grid (`ddim_timesteps`) and the boundary conditions (`boundary_conditions`) are defined
by the LCM sampler in dit.diffusion.samplers and imported here (and re-exported), so that
the sampler does not depend on this training objective.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dit.diffusion import schedules
from dit.diffusion.samplers import boundary_conditions, ddim_timesteps
from dit.diffusion.schedules import Schedule

Array = jax.Array
DISTANCES = ("huber", "l2")
SOLVERS = ("ddim", "dpmpp_2s")


def consistency_fn(
  out: Array, x: Array, t: Array, schedule: Schedule, prediction: str, **boundary
) -> Array:
  """f(x, t) = c_skip x + c_out x0 from a model output (B, ..., C) at x (B, ...), t (B,)."""
  b = lambda a: schedules._bcast(a, x)
  x0, _ = schedules.to_x0_eps(
    out[..., : x.shape[-1]],
    x,
    b(schedule.sqrt_alphas_cumprod[t]),
    b(schedule.sqrt_one_minus_alphas_cumprod[t]),
    prediction,
  )
  c_skip, c_out = boundary_conditions(t, **boundary)
  return b(c_skip) * x + b(c_out) * x0


def teacher_step(
  teacher_fn: Callable[[Array, Array], Array],
  x_t: Array,
  t: Array,
  s: Array,
  schedule: Schedule,
  prediction: str,
  solver: str = "ddim",
) -> Array:
  """x_s: one step of the (guided) teacher's probability-flow ODE from timesteps t to s (B,).

  ddim: x_s = alpha_s x0 + sigma_s eps (first order). dpmpp_2s: DPM-Solver++(2S) (Lu et
  al. 2022, Alg. 1 with r = 1/2): the teacher is evaluated again at the log-SNR midpoint m
  (a fractional timestep), and x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) x0(x_m),
  h = lambda_s - lambda_t.
  """
  if solver not in SOLVERS:
    raise ValueError(f"Unknown consistency solver {solver!r}; expected one of {SOLVERS}")
  b = lambda a: schedules._bcast(a, x_t)
  c = x_t.shape[-1]
  a_t, s_t = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
  a_s, s_s = schedule.sqrt_alphas_cumprod[s], schedule.sqrt_one_minus_alphas_cumprod[s]
  x0_t, eps_t = schedules.to_x0_eps(teacher_fn(x_t, t)[..., :c], x_t, b(a_t), b(s_t), prediction)
  if solver == "ddim":
    return b(a_s) * x0_t + b(s_s) * eps_t
  k_t, k_s = s_t / a_t, s_s / a_s  # k = sigma / alpha = exp(-lambda)
  h = jnp.log(k_t / k_s)
  k_m = jnp.sqrt(k_t * k_s)
  a_m = 1.0 / jnp.sqrt(1.0 + k_m**2)
  s_m = k_m * a_m
  x_m = b(s_m / s_t) * x_t - b(a_m * jnp.expm1(-h / 2)) * x0_t
  t_m = schedules.sigma_to_t(schedule, k_m)
  x0_m, _ = schedules.to_x0_eps(teacher_fn(x_m, t_m)[..., :c], x_m, b(a_m), b(s_m), prediction)
  return b(s_s / s_t) * x_t - b(a_s * jnp.expm1(-h)) * x0_m


def distillation_loss(
  student_fn: Callable[[Array, Array], Array],
  teacher_fn: Callable[[Array, Array], Array],
  target_fn: Callable[[Array, Array], Array],
  x0: Array,
  schedule: Schedule,
  *,
  index: Array,
  noise: Array,
  num_ddim_timesteps: int = 50,
  prediction: str = "eps",
  solver: str = "ddim",
  distance: str = "huber",
  huber_c: float = 0.001,
  timestep_scaling: float = 10.0,
) -> tuple[Array, dict[str, Array]]:
  """Per-example consistency-distillation loss (B,).

  Args:
    student_fn: (x (B, ...), t (B,) int32) -> output of the student being trained.
    teacher_fn: the same for the frozen teacher, with guidance already applied.
    target_fn: the same for the EMA target network (its gradient is stopped here).
    x0: clean data (B, ..., C).
    schedule: the teacher's training schedule.
    index: (B,) int32 in [0, N): grid point n of each example's start timestep t_n.
    noise: like x0, the eps of x_t.
    num_ddim_timesteps: N, the size of the distillation grid.
    prediction: the models' prediction type ("eps", "v", "x0").
    solver: the teacher's ODE step, "ddim" or "dpmpp_2s" (see `teacher_step`).
    distance: "huber" (pseudo-Huber, c = huber_c) or "l2" (squared error).
  Returns:
    loss (B,), and aux: {"t", "s"} (B,) the start and target timesteps, "x_s" (like x0)
    the teacher's solver step.
  """
  schedules.check_prediction(prediction)
  if distance not in DISTANCES:
    raise ValueError(f"Unknown consistency distance {distance!r}; expected one of {DISTANCES}")
  grid = jnp.asarray(ddim_timesteps(schedule.T, num_ddim_timesteps))
  t = grid[index]
  s = jnp.maximum(t - schedule.T // num_ddim_timesteps, 0)
  x_t = schedules.q_sample(schedule, x0, t, noise)
  x_s = jax.lax.stop_gradient(teacher_step(teacher_fn, x_t, t, s, schedule, prediction, solver))

  boundary = dict(timestep_scaling=timestep_scaling)
  pred = consistency_fn(student_fn(x_t, t), x_t, t, schedule, prediction, **boundary)
  target = consistency_fn(target_fn(x_s, s), x_s, s, schedule, prediction, **boundary)
  diff2 = (pred - jax.lax.stop_gradient(target)) ** 2
  if distance == "huber":
    per_elem = jnp.sqrt(diff2 + huber_c**2) - huber_c
  else:
    per_elem = diff2
  loss = jnp.mean(per_elem, axis=tuple(range(1, x0.ndim)))
  return loss, {"t": t, "s": s, "x_s": x_s}
