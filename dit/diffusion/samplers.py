"""Samplers: one `jax.lax.scan` driver, one small step function per sampler, and a registry.

A sampler is instantiated on a time grid as a `Plan`:
  infos:  dict of arrays with a leading axis of length n (one entry per scan step, i.e. per
          model evaluation), computed up front: model timestep "t", the VP coefficients
          "a", "s" (alpha_t, sigma_t) at the evaluation point, those of the state after the
          step ("a_next", "s_next"), flags such as "order" for multistep starts, ...
  init:   x (native space) -> carry (a dict holding "x" and any solver history)
  step:   (carry, info, predict, noise) -> carry
  space:  "vp" if the state is x = alpha x0 + sigma eps (DDPM, DDIM, DPM-Solver++, UniPC,
          LCM) or "ve" if it is x / alpha = x0 + k eps (Euler, Euler ancestral, Heun).
  needs_noise: False for a deterministic plan: `run_plan` then draws nothing (no PRNG op
          is traced) and passes zeros as `noise`.
`run_plan` scans `step` over `infos`; `sample` builds the plan and runs it. First-order
starts and the final step to sigma = 0 are flags in `infos`, never Python branches, so the
model is traced exactly once. Guidance and editing wrap `denoise` or use the plan's
coefficients; they do not touch the steps.

Time grids follow Hugging Face diffusers exactly, each sampler its own scheduler's
`set_timesteps` formula per `timestep_spacing` (see `schedules.spaced_timesteps` and
docs/samplers.md), its first noise scale (`init_noise_sigma`) and its final step (to
alphas_cumprod 1, or alphas_cumprod[0] for DDIM with set_alpha_to_one=False; to sigma 0).
Custom `timesteps` (or `sigmas`, Euler) from the settings replace the computed grid.

Every setting of a sampler lives in one frozen, hashable `SamplerSettings` (a static jit
argument); `SAMPLERS` maps each sampler name to a `SamplerSpec`: its grid builder, its plan
builder and what it accepts. Adding a sampler = a plan function + one `SAMPLERS` entry.

Conventions: `denoise(x, t)` takes the VP-scaled sample x (B, ...) and float timesteps
t (B,) in [0, T) and returns the model output (B, ..., C) or (B, ..., 2C) with learned
sigma. `x_T` is unit Gaussian noise; each plan scales it as diffusers does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dit.diffusion import editing, schedules
from dit.diffusion.schedules import Schedule

Array = jax.Array
Denoise = Callable[[Array, Array], Array]
# predict(x_native, info) -> (x0, eps, variance interpolation v or None)
Predict = Callable[[Array, dict], tuple[Array, Array, Array | None]]

SPACINGS = ("leading", "trailing", "linspace")
LCM_MAX_STEPS = 8
DDPM_VARIANCES = ("fixed_small", "fixed_large", "learned_range")
DDIM_STEPS = ("grid", "diffusers")


@dataclasses.dataclass(frozen=True)
class Plan:
  """A sampler on a concrete time grid (see the module docstring)."""

  infos: dict[str, Array]
  init: Callable[[Array], dict[str, Array]]
  step: Callable[[dict[str, Array], dict[str, Array], Predict, Array], dict[str, Array]]
  space: str  # "vp" or "ve"
  noise_scale: Array  # x_native = noise_scale * x_T when starting from pure noise
  single_step: bool = True  # no history in the carry: RePaint resampling is allowed
  needs_noise: bool = True  # step uses its noise argument (False: run_plan draws none)

  @property
  def num_steps(self) -> int:
    return int(self.infos["t"].shape[0])


# ----------------------------------------------------------------------------- time grids


def _ve_to_vp(k: Array) -> tuple[Array, Array]:
  a = 1.0 / jnp.sqrt(k**2 + 1.0)
  return a, k * a


def _grid_from_timesteps(
  schedule: Schedule,
  ts: np.ndarray,
  prev: np.ndarray | None = None,
  final_alphas_cumprod: float | Array = 1.0,
) -> dict:
  """VP grid at integer timesteps ts (n,): alphas_cumprod "ab", alpha "a", sigma "s", and
  the same ("ab_next", ...) at the timesteps `prev` (n,) each step goes to.

  prev defaults to the next grid point; where it is < 0 (the last step by default) the
  state goes to `final_alphas_cumprod` (1: x0, as DDPM; diffusers' DDIM final_alpha_cumprod).
  """
  ts = np.asarray(ts, np.int64)
  prev = np.concatenate([ts[1:], [-1]]) if prev is None else np.asarray(prev, np.int64)
  ab = schedule.alphas_cumprod[ts]
  final = jnp.asarray(final_alphas_cumprod, ab.dtype)
  ab_next = jnp.where(prev >= 0, schedule.alphas_cumprod[np.maximum(prev, 0)], final)
  return {
    "t": jnp.asarray(ts, jnp.float32),
    "ab": ab,
    "ab_next": ab_next,
    "a": jnp.sqrt(ab),
    "s": jnp.sqrt(1.0 - ab),
    "a_next": jnp.sqrt(ab_next),
    "s_next": jnp.sqrt(1.0 - ab_next),
  }


def discrete_grid(schedule: Schedule, steps: int, spacing: str, offset: int = 0) -> dict:
  """Integer timesteps (n,) and their VP alpha/sigma, plus the next point (1, 0 at the end)."""
  return _grid_from_timesteps(
    schedule, schedules.spaced_timesteps(schedule.T, steps, spacing, offset)
  )


def _k_table(schedule: Schedule) -> Array:
  """k-sigma (T,) of every timestep; a zero-terminal-SNR schedule's infinite sigma is
  clamped to alphas_cumprod = 2^-24, as diffusers does."""
  ab_all = jnp.maximum(schedule.alphas_cumprod, 2.0**-24)
  return jnp.sqrt((1.0 - ab_all) / ab_all)


def _sigma_to_t(k: Array, k_all: Array) -> Array:
  """Fractional timesteps of k-sigmas k, linear in log sigma (diffusers' _sigma_to_t)."""
  t_all = jnp.arange(k_all.shape[0], dtype=jnp.float32)
  return jnp.interp(jnp.log(jnp.maximum(k, 1e-10)), jnp.log(k_all), t_all)


def _ve_grid(t: Array, k: Array, k_next: Array) -> dict:
  a, s = _ve_to_vp(k)
  a_next, s_next = _ve_to_vp(k_next)
  return {"t": t, "k": k, "k_next": k_next, "a": a, "s": s, "a_next": a_next, "s_next": s_next}


def sigma_grid_from_timesteps(
  schedule: Schedule,
  ts: np.ndarray,
  *,
  karras: bool = False,
  karras_full_range: bool = False,
  rho: float = 7.0,
  round_timesteps: bool = False,
) -> dict:
  """A k-sigma grid (n,) at timesteps ts (n,), ending at sigma = 0, as diffusers' k-sigma
  schedulers build it.

  Integer ts take the table's sigmas; fractional ones interpolate them linearly in t
  (np.interp, as diffusers' Euler, Euler ancestral and Heun). With `karras`, n Karras sigmas
  between the end points of that grid (or of the whole schedule if `karras_full_range`),
  mapped back to fractional (or rounded) timesteps by interpolation in log sigma.
  """
  ts = np.asarray(ts)
  k_all = _k_table(schedule)
  if np.issubdtype(ts.dtype, np.integer):
    k = k_all[ts]
  else:
    k = jnp.interp(jnp.asarray(ts, jnp.float32), jnp.arange(schedule.T, dtype=jnp.float32), k_all)
  t = jnp.asarray(ts, jnp.float32)
  if karras:
    lo, hi = (k_all[0], k_all[-1]) if karras_full_range else (k[-1], k[0])
    k = schedules.karras_sigmas(lo, hi, ts.shape[0], rho)
    t = _sigma_to_t(k, k_all)
    if round_timesteps:
      t = jnp.round(t)
  return _ve_grid(t, k, jnp.concatenate([k[1:], jnp.zeros((1,), k.dtype)]))


def sigma_grid_from_sigmas(schedule: Schedule, sigmas) -> dict:
  """A k-sigma grid (n,) on given sigmas (n + 1,): n noise levels and the final one (diffusers'
  EulerDiscreteScheduler.set_timesteps(sigmas=...)); timesteps by log-sigma interpolation."""
  sig = jnp.asarray(np.asarray(sigmas, np.float32))
  return _ve_grid(_sigma_to_t(sig[:-1], _k_table(schedule)), sig[:-1], sig[1:])


def sigma_grid(
  schedule: Schedule,
  steps: int,
  spacing: str,
  *,
  karras: bool = False,
  karras_full_range: bool = False,
  rho: float = 7.0,
  round_timesteps: bool = False,
  offset: int = 0,
  multistep: bool = False,
  fractional: bool = False,
) -> dict:
  """`sigma_grid_from_timesteps` on `schedules.spaced_timesteps` (multistep, fractional: its
  per-scheduler rules)."""
  ts = schedules.spaced_timesteps(
    schedule.T, steps, spacing, offset, multistep=multistep, fractional=fractional
  )
  return sigma_grid_from_timesteps(
    schedule,
    ts,
    karras=karras,
    karras_full_range=karras_full_range,
    rho=rho,
    round_timesteps=round_timesteps,
  )


def init_noise_sigma(k: Array, spacing: str) -> Array:
  """diffusers' init_noise_sigma of its k-sigma schedulers (Euler, Euler ancestral, Heun).

  k (n,) the grid's sigmas. For linspace and trailing grids diffusers scales x_T by k_max,
  for leading ones by sqrt(k_max^2 + 1), x_T's exact std in VE space (larger by a factor
  1 + 2e-5 for DiT's linear schedule, 1 + 2.3e-3 for Stable Diffusion's).
  """
  k_max = jnp.max(k)
  return k_max if spacing in ("linspace", "trailing") else jnp.sqrt(k_max**2 + 1.0)


def ddim_timesteps(num_timesteps: int, num_ddim_timesteps: int) -> np.ndarray:
  """The consistency-distillation grid (N,) int32, ascending: (n + 1) * (T // N) - 1, n < N.

  It lives here, not in dit.diffusion.consistency, because the LCM sampler steps on it and a
  sampler must not import a training objective; consistency.py imports it from here.
  """
  if not 1 <= num_ddim_timesteps <= num_timesteps:
    raise ValueError(
      f"num_ddim_timesteps must be in [1, T={num_timesteps}], got {num_ddim_timesteps}"
    )
  k = num_timesteps // num_ddim_timesteps
  return (np.arange(1, num_ddim_timesteps + 1) * k - 1).astype(np.int32)


def check_lcm_steps(num_timesteps: int, steps: int, original_steps: int) -> None:
  """LCM's rules: 1 <= steps <= LCM_MAX_STEPS and steps <= original_steps <= T."""
  if not 1 <= steps <= LCM_MAX_STEPS:
    raise ValueError(f"LCM sampling takes 1 to {LCM_MAX_STEPS} steps, got steps={steps}")
  if not steps <= original_steps <= num_timesteps:
    raise ValueError(
      f"LCM needs steps <= lcm_original_steps <= T, got steps={steps}, "
      f"lcm_original_steps={original_steps}, T={num_timesteps}"
    )


def lcm_timesteps(num_timesteps: int, steps: int, original_steps: int = 50) -> np.ndarray:
  """LCM's timesteps (steps,), descending: a subset of the distillation grid k - 1, 2k - 1, ...

  steps is 1..LCM_MAX_STEPS: a consistency model maps any point to x0, so more steps only
  re-noise and re-denoise (LCM reports no gain beyond 4-8).
  """
  check_lcm_steps(num_timesteps, steps, original_steps)
  origin = ddim_timesteps(num_timesteps, original_steps)[::-1]
  idx = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
  return origin[idx]


# ----------------------------------------------------------------------------- samplers


def ddpm_plan(grid: dict, *, variance: str = "fixed_small") -> Plan:
  """Ancestral sampling from p(x_{t'}|x_t) on any sub-grid t > t' (DDPM; DiT respacing).

  variance: "fixed_small" (posterior variance), "fixed_large" (beta_t), or "learned_range"
  (log-interpolation between them by the model's variance channels, improved DDPM).
  No noise is added on the final step to x0.
  """
  if variance not in DDPM_VARIANCES:
    raise ValueError(f"Unknown DDPM variance {variance!r}; expected one of {DDPM_VARIANCES}")
  n = grid["t"].shape[0]
  infos = dict(grid, noisy=jnp.asarray(np.arange(n) < n - 1, jnp.float32))

  def step(carry, info, predict, noise):
    x = carry["x"]
    x0, _, v = predict(x, info)
    ab, ab_prev = info["ab"], info["ab_next"]
    alpha_step = ab / ab_prev
    beta_step = 1.0 - alpha_step
    mean = (jnp.sqrt(ab_prev) * beta_step / (1.0 - ab)) * x0 + (
      jnp.sqrt(alpha_step) * (1.0 - ab_prev) / (1.0 - ab)
    ) * x
    small = jnp.maximum((1.0 - ab_prev) / (1.0 - ab) * beta_step, 1e-20)
    if variance == "fixed_small":
      std = jnp.sqrt(small)
    elif variance == "fixed_large":
      std = jnp.sqrt(beta_step)
    else:
      if v is None:
        raise ValueError("variance='learned_range' needs a model with learn_sigma=True")
      frac = (v + 1.0) / 2.0
      std = jnp.exp(0.5 * (frac * jnp.log(beta_step) + (1.0 - frac) * jnp.log(small)))
    return {"x": mean + info["noisy"] * std * noise}

  return Plan(infos, lambda x: {"x": x}, step, "vp", jnp.float32(1.0), needs_noise=n > 1)


def ddim_plan(grid: dict, *, eta: float = 0.0) -> Plan:
  """DDIM (Song et al. 2021); eta = 0 deterministic (draws no noise), eta = 1 DDPM-like.

  Each step goes from "ab" to "ab_next": diffusers' DDIM goes to t - T // steps, which is not
  always the next grid point (`_ddim_grid`).
  """

  def step(carry, info, predict, noise):
    x = carry["x"]
    x0, eps, _ = predict(x, info)
    ab, ab_next = info["ab"], info["ab_next"]
    var = ((1.0 - ab_next) / (1.0 - ab)) * (1.0 - ab / ab_next)
    std = eta * jnp.sqrt(var)
    direction = jnp.sqrt(jnp.maximum(1.0 - ab_next - std**2, 0.0)) * eps
    x_next = info["a_next"] * x0 + direction
    return {"x": x_next + std * noise if eta else x_next}

  return Plan(dict(grid), lambda x: {"x": x}, step, "vp", jnp.float32(1.0), needs_noise=eta != 0)


def _ve_noise_scale(k: Array, noise_scale: Array | None) -> Array:
  return jnp.sqrt(k[0] ** 2 + 1.0) if noise_scale is None else noise_scale


def euler_plan(grid: dict, *, noise_scale: Array | None = None) -> Plan:
  """Euler on the probability-flow ODE dx/dk = (x - x0) / k in VE space (k-diffusion).

  noise_scale: x_T's scale at the start (default sqrt(k_0^2 + 1); see `init_noise_sigma`).
  """

  def step(carry, info, predict, noise):
    x = carry["x"]
    x0, _, _ = predict(x, info)
    d = (x - x0) / info["k"]
    return {"x": x + d * (info["k_next"] - info["k"])}

  scale = _ve_noise_scale(grid["k"], noise_scale)
  return Plan(dict(grid), lambda x: {"x": x}, step, "ve", scale, needs_noise=False)


def euler_ancestral_plan(grid: dict, *, noise_scale: Array | None = None) -> Plan:
  """Euler ancestral: an Euler step down to k_down plus fresh noise of std k_up."""
  k, k_next = grid["k"], grid["k_next"]
  k_up = jnp.sqrt(k_next**2 * (k**2 - k_next**2) / k**2)
  infos = dict(grid, k_up=k_up, k_down=jnp.sqrt(k_next**2 - k_up**2))

  def step(carry, info, predict, noise):
    x = carry["x"]
    x0, _, _ = predict(x, info)
    d = (x - x0) / info["k"]
    return {"x": x + d * (info["k_down"] - info["k"]) + info["k_up"] * noise}

  # A one-point grid's only step ends at k = 0 (k_up = 0): no noise.
  scale = _ve_noise_scale(k, noise_scale)
  return Plan(infos, lambda x: {"x": x}, step, "ve", scale, needs_noise=k.shape[0] > 1)


def heun_plan(grid: dict, *, noise_scale: Array | None = None) -> Plan:
  """Heun's 2nd-order method (EDM, deterministic), one model evaluation per scan step.

  As in diffusers the n grid points give 2n - 1 evaluations: a predictor (Euler) evaluation
  at k_j and, for every step that does not end at k = 0, a corrector evaluation at k_{j+1}
  that averages the two slopes. Which one a scan step is, is the "first" flag.
  """
  n = grid["k"].shape[0]
  idx = np.concatenate([[0], np.repeat(np.arange(1, n), 2)])
  first = np.ones(2 * n - 1, bool)
  first[1::2] = False
  k = grid["k"][idx]
  k_to = jnp.where(first, grid["k_next"][idx], k)  # where the state is after this scan step
  a_next, s_next = _ve_to_vp(k_to)
  infos = {
    "t": grid["t"][idx],
    "a": grid["a"][idx],
    "s": grid["s"][idx],
    "k": k,
    "k_to": k_to,
    "a_next": a_next,
    "s_next": s_next,
    "first": jnp.asarray(first),
  }

  def init(x):
    return {"x": x, "x_prev": x, "d_prev": jnp.zeros_like(x), "dt": jnp.zeros((), x.dtype)}

  def step(carry, info, predict, noise):
    x = carry["x"]
    x0, _, _ = predict(x, info)
    d = (x - x0) / info["k"]
    dt = info["k_to"] - info["k"]
    predictor = x + d * dt
    corrector = carry["x_prev"] + 0.5 * (carry["d_prev"] + d) * carry["dt"]
    f = info["first"]
    return {
      "x": jnp.where(f, predictor, corrector),
      "x_prev": jnp.where(f, x, carry["x_prev"]),
      "d_prev": jnp.where(f, d, carry["d_prev"]),
      "dt": jnp.where(f, dt, carry["dt"]),
    }

  scale = _ve_noise_scale(grid["k"], noise_scale)
  return Plan(infos, init, step, "ve", scale, single_step=False, needs_noise=False)


def _lambdas(grid: dict) -> dict:
  """log-SNR lambda = log(a / s) at each grid point, the previous two, and the next one.

  Entries that a step does not use (history before the start, lambda at s = 0) get finite
  stand-ins so that the unselected branches of jnp.where stay finite.
  """
  lam = jnp.log(grid["a"]) - jnp.log(grid["s"])
  final = grid["s_next"] <= 0
  lam_next = jnp.log(grid["a_next"]) - jnp.log(jnp.where(final, 1.0, grid["s_next"]))
  lam_next = jnp.where(final, lam + 50.0, lam_next)  # exp(-50) == 0 in float32
  lam_p1 = jnp.concatenate([lam[:1] - 1.0, lam[:-1]])
  lam_p2 = jnp.concatenate([lam[:1] - 2.0, lam[:1] - 1.0, lam[:-2]])[: lam.shape[0]]
  return {"lam": lam, "lam_next": lam_next, "lam_p1": lam_p1, "lam_p2": lam_p2}


def dpmpp_plan(grid: dict, *, order: int = 2, sde: bool = False) -> Plan:
  """DPM-Solver++ multistep (Lu et al. 2022) in data prediction, orders 1-3, ODE or SDE.

  order 2 is "2M" (midpoint form), order 3 "3M" (ODE only, as diffusers). The step order is
  data: 1 at the start, rising by one per step up to `order`, 1 on the final step to
  sigma = 0, and at most 2 on the second-to-last step when there are fewer than 15 steps.
  """
  n = grid["t"].shape[0]
  i = np.arange(n)
  orders = np.minimum(i + 1, order)
  orders[-1] = 1
  if n < 15 and n >= 2:
    orders[-2] = min(orders[-2], 2)
  infos = dict(grid, **_lambdas(grid), order=jnp.asarray(orders, jnp.int32))

  def init(x):
    return {"x": x, "m1": jnp.zeros_like(x), "m2": jnp.zeros_like(x)}

  def step(carry, info, predict, noise):
    x, m1, m2 = carry["x"], carry["m1"], carry["m2"]
    m0, _, _ = predict(x, info)
    a_t, s_t, s_s = info["a_next"], info["s_next"], info["s"]
    h = info["lam_next"] - info["lam"]
    h0 = info["lam"] - info["lam_p1"]
    h1 = info["lam_p1"] - info["lam_p2"]
    r0, r1 = h0 / h, h1 / h
    d1_0 = (m0 - m1) / r0
    if sde:
      em = -jnp.expm1(-2.0 * h)  # 1 - exp(-2h)
      base = (s_t / s_s * jnp.exp(-h)) * x + (a_t * em) * m0 + s_t * jnp.sqrt(em) * noise
      x1 = base
      x2 = base + 0.5 * (a_t * em) * d1_0
      x3 = x2
    else:
      em = jnp.expm1(-h)  # exp(-h) - 1
      x1 = (s_t / s_s) * x - (a_t * em) * m0
      x2 = x1 - 0.5 * (a_t * em) * d1_0
      d1_1 = (m1 - m2) / r1
      d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      x3 = x1 + (a_t * (em / h + 1.0)) * d1 - (a_t * ((em + h) / h**2 - 0.5)) * d2
    o = info["order"]
    x_new = jnp.where(o == 1, x1, jnp.where(o == 2, x2, x3))
    return {"x": x_new, "m1": m0, "m2": m1}

  # The SDE's one step of a one-point grid ends at sigma = 0: no noise.
  needs_noise = sde and n > 1
  return Plan(infos, init, step, "vp", jnp.float32(1.0), single_step=False, needs_noise=needs_noise)


def unipc_plan(grid: dict) -> Plan:
  """UniPC (Zhao et al. 2023), B(h) = e^h - 1 ("bh2"), order 2, data prediction.

  Each scan step evaluates the model at the current point, applies the corrector UniC to
  the state the previous predictor produced (not at the start), then the predictor UniP.
  Orders as diffusers: predictor 1 at the start and on the final step; the corrector uses
  the previous predictor's order.
  """
  n = grid["t"].shape[0]
  p_order = np.minimum(np.arange(n) + 1, 2)
  p_order[-1] = 1
  c_order = np.concatenate([[0], p_order[:-1]])  # 0: no corrector
  infos = dict(
    grid,
    **_lambdas(grid),
    a_prev=jnp.concatenate([grid["a"][:1], grid["a"][:-1]]),
    s_prev=jnp.concatenate([grid["s"][:1], grid["s"][:-1]]),
    p_order=jnp.asarray(p_order, jnp.int32),
    c_order=jnp.asarray(c_order, jnp.int32),
  )

  def init(x):
    z = jnp.zeros_like(x)
    return {"x": x, "x_last": x, "m1": z, "m2": z}

  def step(carry, info, predict, noise):
    x, x_last, m1, m2 = carry["x"], carry["x_last"], carry["m1"], carry["m2"]
    m_t, _, _ = predict(x, info)
    # Corrector from the previous point (lam_p1, state x_last) to this one (lam).
    h = info["lam"] - info["lam_p1"]
    em = jnp.expm1(-h)  # h * phi_1(-h) and also B(h) for bh2
    b1 = (em / -h - 1.0) / em
    b2 = 2.0 * ((em / -h - 1.0) / -h - 0.5) / em
    rk = (info["lam_p2"] - info["lam_p1"]) / h
    base = (info["s"] / info["s_prev"]) * x_last - (info["a"] * em) * m1
    corr1 = base - info["a"] * em * 0.5 * (m_t - m1)
    rho0 = (b1 - b2) / (1.0 - rk)
    rho1 = b1 - rho0
    corr2 = base - info["a"] * em * (rho0 * (m2 - m1) / rk + rho1 * (m_t - m1))
    co = info["c_order"]
    x = jnp.where(co == 0, x, jnp.where(co == 1, corr1, corr2))
    # Predictor from this point to the next.
    h = info["lam_next"] - info["lam"]
    em = jnp.expm1(-h)
    pred1 = (info["s_next"] / info["s"]) * x - (info["a_next"] * em) * m_t
    rk = (info["lam_p1"] - info["lam"]) / h
    pred2 = pred1 - info["a_next"] * em * 0.5 * (m1 - m_t) / rk
    x_new = jnp.where(info["p_order"] == 1, pred1, pred2)
    return {"x": x_new, "x_last": x, "m1": m_t, "m2": m1}

  return Plan(infos, init, step, "vp", jnp.float32(1.0), single_step=False, needs_noise=False)


def boundary_conditions(
  t: Array, *, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> tuple[Array, Array]:
  """(c_skip(t), c_out(t)), each shaped like t (timesteps in [0, T)); (1, 0) at t = 0.

  LCM's consistency parameterisation f = c_skip x + c_out x0, shared by the LCM sampler and
  the distillation objective (dit.diffusion.consistency imports it from here).
  """
  ts = jnp.asarray(t, jnp.float32) * timestep_scaling
  c_skip = sigma_data**2 / (ts**2 + sigma_data**2)
  c_out = ts / jnp.sqrt(ts**2 + sigma_data**2)
  return c_skip, c_out


def lcm_plan(grid: dict, *, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> Plan:
  """Latent consistency model multistep sampling (Luo et al. 2023), for distilled models.

  denoised = c_out(t) x0_pred + c_skip(t) x, then re-noised to the next grid point with fresh
  noise (none after the last step).
  """
  n = grid["t"].shape[0]
  c_skip, c_out = boundary_conditions(
    grid["t"], timestep_scaling=timestep_scaling, sigma_data=sigma_data
  )
  infos = dict(
    grid, c_skip=c_skip, c_out=c_out, noisy=jnp.asarray(np.arange(n) < n - 1, jnp.float32)
  )

  def step(carry, info, predict, noise):
    x = carry["x"]
    x0, _, _ = predict(x, info)
    denoised = info["c_out"] * x0 + info["c_skip"] * x
    renoised = info["a_next"] * denoised + info["s_next"] * noise
    return {"x": jnp.where(info["noisy"] > 0, renoised, denoised)}

  return Plan(infos, lambda x: {"x": x}, step, "vp", jnp.float32(1.0), needs_noise=n > 1)


# ----------------------------------------------------------------------------- registry

GridFn = Callable[[Schedule, "SamplerSettings"], dict]
PlanFn = Callable[[dict, "SamplerSettings"], Plan]
TimestepFn = Callable[[int, "SamplerSettings"], np.ndarray]


def discrete_timesteps(num_timesteps: int, s: SamplerSettings) -> np.ndarray:
  """int64 (n,): s.timesteps, else diffusers' DDPMScheduler / DDIMScheduler formula."""
  if s.timesteps is not None:
    return np.asarray(s.timesteps, np.float64).astype(np.int64)
  return schedules.spaced_timesteps(num_timesteps, s.steps, s.timestep_spacing, s.steps_offset)


def fractional_timesteps(num_timesteps: int, s: SamplerSettings) -> np.ndarray:
  """float32 (n,): s.timesteps, else the formula of diffusers' Euler, Euler ancestral and
  Heun schedulers (linspace keeps fractional timesteps)."""
  if s.timesteps is not None:
    return np.asarray(s.timesteps, np.float32)
  return schedules.spaced_timesteps(
    num_timesteps, s.steps, s.timestep_spacing, s.steps_offset, fractional=True
  )


def multistep_timesteps(num_timesteps: int, s: SamplerSettings) -> np.ndarray:
  """int64 (n,): s.timesteps, else diffusers' DPMSolverMultistep / UniPC formula (linspace
  and leading on n + 1 points, the last dropped)."""
  if s.timesteps is not None:
    return np.asarray(s.timesteps, np.float64).astype(np.int64)
  return schedules.spaced_timesteps(
    num_timesteps, s.steps, s.timestep_spacing, s.steps_offset, multistep=True
  )


def _lcm_timesteps(num_timesteps: int, s: SamplerSettings) -> np.ndarray:
  if s.timesteps is not None:
    return np.asarray(s.timesteps, np.float64).astype(np.int64)
  return lcm_timesteps(num_timesteps, s.steps, s.lcm_original_steps)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """One `SAMPLERS` entry: how a sampler builds its time grid and plan from the settings."""

  description: str  # one line, for --help
  grid: GridFn  # (schedule, settings) -> grid of (n,) arrays, before the img2img cut
  plan: PlanFn  # (grid, settings) -> Plan
  karras: bool = False  # whether settings.karras (Karras sigmas) is allowed
  deterministic: bool = True  # no per-step noise (ddim: at eta = 0)
  spacing: str = "trailing"  # default timestep spacing (`SamplerSettings.from_config`)
  # Extra checks of the settings beyond `SamplerSettings.check`: (settings, T) -> None.
  check: Callable[[SamplerSettings, int], None] | None = None
  # (T, settings) -> the timesteps (n,) the grid is built on: the diffusers scheduler's own
  # formula per spacing, or settings.timesteps.
  timesteps: TimestepFn = discrete_timesteps
  fractional: bool = False  # custom timesteps may be fractional (else integers)
  custom_sigmas: bool = False  # settings.sigmas is allowed
  spaced: bool = True  # the grid follows timestep_spacing (lcm: the distillation grid)
  diffusers: str = ""  # the diffusers scheduler (and settings) it matches step by step


def sampler_timesteps(num_timesteps: int, settings: SamplerSettings) -> np.ndarray:
  """The timesteps (n,) settings.sampler builds its grid on (before any Karras sigmas)."""
  return SAMPLERS[settings.sampler].timesteps(num_timesteps, settings)


def _discrete_grid(schedule: Schedule, s: SamplerSettings) -> dict:
  return _grid_from_timesteps(schedule, sampler_timesteps(schedule.T, s))


def _ddim_grid(schedule: Schedule, s: SamplerSettings) -> dict:
  # ddim_step="diffusers": diffusers' DDIM steps from t to t - T // steps, which is not the
  # next grid point on trailing and linspace grids whose spacing is not T // steps: the state
  # then lands between grid points and the next step starts from the wrong noise level (the
  # error stops falling with more steps). "grid" (ours) always steps to the next grid point;
  # the two agree on leading grids (diffusers' default and Stable Diffusion's).
  ts = sampler_timesteps(schedule.T, s)
  diffusers_rule = s.ddim_step == "diffusers" and s.timesteps is None
  prev = ts - schedule.T // s.steps if diffusers_rule else None
  final = 1.0 if s.set_alpha_to_one else schedule.alphas_cumprod[0]
  return _grid_from_timesteps(schedule, ts, prev, final)


def _spaced_sigma_grid(schedule: Schedule, s: SamplerSettings) -> dict:
  # k-diffusion-style samplers take Karras' range from the spaced grid, as diffusers' Euler
  # and Heun schedulers do.
  if s.sigmas is not None:
    return sigma_grid_from_sigmas(schedule, s.sigmas)
  return sigma_grid_from_timesteps(schedule, sampler_timesteps(schedule.T, s), karras=s.karras)


def _full_range_sigma_grid(schedule: Schedule, s: SamplerSettings) -> dict:
  # The DPM-Solver family takes Karras' range from the whole schedule and rounds the model
  # timesteps, as diffusers' DPMSolverMultistep and UniPC schedulers do.
  ts = sampler_timesteps(schedule.T, s)
  full = dict(karras_full_range=True, round_timesteps=True)
  return sigma_grid_from_timesteps(schedule, ts, karras=s.karras, **full)


def _lcm_grid(schedule: Schedule, s: SamplerSettings) -> dict:
  return _grid_from_timesteps(schedule, sampler_timesteps(schedule.T, s))


def _ve_plan(plan_fn: Callable[..., Plan]) -> PlanFn:
  """A k-sigma sampler's PlanFn, starting from diffusers' init_noise_sigma."""
  return lambda grid, s: plan_fn(grid, noise_scale=init_noise_sigma(grid["k"], s.timestep_spacing))


_SIGMA = dict(timesteps=fractional_timesteps, fractional=True, karras=True)
_MULTISTEP = dict(timesteps=multistep_timesteps, karras=True)
_DPM = "DPMSolverMultistepScheduler"

SAMPLERS: dict[str, SamplerSpec] = {
  "ddpm": SamplerSpec(
    "ancestral DDPM steps on any sub-grid (variance fixed_small | fixed_large | learned_range)",
    _discrete_grid,
    lambda grid, s: ddpm_plan(grid, variance=s.variance or "fixed_small"),
    deterministic=False,
    diffusers="DDPMScheduler",
  ),
  "ddim": SamplerSpec(
    "DDIM, deterministic at eta = 0",
    _ddim_grid,
    lambda grid, s: ddim_plan(grid, eta=s.eta),
    diffusers="DDIMScheduler",
  ),
  "euler": SamplerSpec(
    "Euler on the probability-flow ODE (k-diffusion)",
    _spaced_sigma_grid,
    _ve_plan(euler_plan),
    custom_sigmas=True,
    diffusers="EulerDiscreteScheduler",
    **_SIGMA,
  ),
  "euler_ancestral": SamplerSpec(
    "Euler ancestral: an Euler step plus fresh noise",
    _spaced_sigma_grid,
    _ve_plan(euler_ancestral_plan),
    deterministic=False,
    diffusers="EulerAncestralDiscreteScheduler",
    **_SIGMA,
  ),
  "heun": SamplerSpec(
    "Heun's 2nd-order method (EDM), 2 * steps - 1 model evaluations",
    _spaced_sigma_grid,
    _ve_plan(heun_plan),
    diffusers="HeunDiscreteScheduler",
    **_SIGMA,
  ),
  "dpmpp_2m": SamplerSpec(
    "DPM-Solver++(2M), 2nd-order multistep",
    _full_range_sigma_grid,
    lambda grid, s: dpmpp_plan(grid, order=2),
    diffusers=_DPM,
    **_MULTISTEP,
  ),
  "dpmpp_2m_sde": SamplerSpec(
    "DPM-Solver++(2M) SDE, 2nd-order multistep with noise",
    _full_range_sigma_grid,
    lambda grid, s: dpmpp_plan(grid, order=2, sde=True),
    deterministic=False,
    diffusers=f'{_DPM}(algorithm_type="sde-dpmsolver++")',
    **_MULTISTEP,
  ),
  "dpmpp_3m": SamplerSpec(
    "DPM-Solver++(3M), 3rd-order multistep",
    _full_range_sigma_grid,
    lambda grid, s: dpmpp_plan(grid, order=3),
    diffusers=f"{_DPM}(solver_order=3)",
    **_MULTISTEP,
  ),
  "unipc": SamplerSpec(
    "UniPC (bh2), 2nd-order predictor-corrector",
    _full_range_sigma_grid,
    lambda grid, s: unipc_plan(grid),
    diffusers="UniPCMultistepScheduler",
    **_MULTISTEP,
  ),
  "lcm": SamplerSpec(
    f"latent consistency model, 1-{LCM_MAX_STEPS} steps on the distillation grid, for "
    "consistency-distilled models (ignores timestep_spacing)",
    _lcm_grid,
    lambda grid, s: lcm_plan(grid),
    deterministic=False,
    check=lambda s, num_timesteps: check_lcm_steps(num_timesteps, s.steps, s.lcm_original_steps),
    timesteps=_lcm_timesteps,
    spaced=False,
    diffusers="LCMScheduler",
  ),
}


def describe() -> str:
  """One line per registered sampler ("name: description [default spacing; diffusers]")."""
  lines = []
  for name, spec in SAMPLERS.items():
    grid = f"spacing {spec.spacing}" if spec.spaced else "own timesteps"
    ref = f"; as diffusers' {spec.diffusers}" if spec.diffusers else ""
    lines.append(f"{name}: {spec.description} [{grid}{ref}]")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- settings


def _is_int(v: Any) -> bool:
  return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
  return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _as_tuple(name: str, values) -> tuple | None:
  """values (a list, tuple or array) as a hashable tuple of Python numbers."""
  if values is None:
    return None
  values = np.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"custom {name} must be a 1-D sequence, got shape {values.shape}")
  return tuple(values.tolist())


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Every setting of a sampler; frozen and hashable, so it can be a static jit argument.

  sampler: a `SAMPLERS` name. steps: grid points, in [1, T]; every sampler makes `steps`
    model evaluations except heun (2 * steps - 1).
  eta: DDIM noise (0 = deterministic). timestep_spacing ("leading" | "trailing" |
    "linspace") and steps_offset (leading only, as diffusers) pick the timesteps with each
    sampler's own diffusers formula (`SamplerSpec.timesteps`). The default is "trailing" for
    every sampler (and `SamplerSettings.from_config` takes the sampler's `SamplerSpec.spacing`,
    "trailing" for all; `describe()` lists it): it starts at t = T - 1, which zero-terminal-SNR
    models need. diffusers' own defaults are "leading" for ddpm and ddim and "linspace" for
    euler, euler_ancestral, heun, dpmpp_* and unipc; lcm ignores the spacing.
  karras: Karras sigmas (samplers whose spec has karras=True).
  variance: DDPM variance ("fixed_small" | "fixed_large" | "learned_range"); None: learned
    range for a model with learned sigma, else fixed_small.
  clip_x0: clip the predicted x0 to +-clip_x0 (None: no clipping).
  lcm_original_steps: the distillation grid of an LCM model (config.distill.num_ddim_timesteps).
  set_alpha_to_one: DDIM's last step goes to alphas_cumprod 1 (x0; diffusers' default); False
    (Stable Diffusion's configs) goes to alphas_cumprod[0]. Other samplers end at x0 always.
  ddim_step: "grid" (DDIM steps to the next grid point) or "diffusers" (to t - T // steps,
    diffusers' rule; the same on leading grids, off the grid on some trailing/linspace ones).
  timesteps: custom timesteps (n,), strictly decreasing in [0, T), replacing the computed grid
    (steps becomes n; spacing and steps_offset are ignored, karras must be off); fractional
    ones only for euler, euler_ancestral and heun.
  sigmas: custom k-sigmas (n + 1,) for euler, strictly decreasing, the last the final noise
    level (usually 0), as diffusers' set_timesteps(sigmas=...); steps becomes n.
  Lists and arrays given for timesteps or sigmas are stored as tuples (hashable).
  """

  sampler: str = "ddim"
  steps: int = 50
  eta: float = 0.0
  timestep_spacing: str = "trailing"
  steps_offset: int = 0
  karras: bool = False
  variance: str | None = None
  clip_x0: float | None = None
  lcm_original_steps: int = 50
  set_alpha_to_one: bool = True
  ddim_step: str = "grid"
  timesteps: tuple[int | float, ...] | None = None
  sigmas: tuple[float, ...] | None = None

  def __post_init__(self):
    # Custom grids set steps, so that img2img, heun's count and LCM's checks see n.
    for name in ("timesteps", "sigmas"):
      values = _as_tuple(name, getattr(self, name))
      object.__setattr__(self, name, values)
      if values:
        object.__setattr__(self, "steps", len(values) - (name == "sigmas"))

  def check(self, num_timesteps: int) -> None:
    """Raises ValueError naming a bad setting and the valid values, for a schedule of T steps."""
    T = num_timesteps
    spec = SAMPLERS.get(self.sampler)
    if spec is None:
      raise ValueError(
        f"Unknown sampler {self.sampler!r}; valid samplers are: {', '.join(SAMPLERS)}"
      )
    _check_custom_grid(self, spec, T)
    if not _is_int(self.steps):
      raise ValueError(f"steps must be an integer in [1, T={T}], got {self.steps!r}")
    if not 1 <= self.steps <= T:
      raise ValueError(f"steps must be in [1, T={T}], got {self.steps}")
    if self.timestep_spacing not in SPACINGS:
      raise ValueError(
        f"Unknown timestep_spacing {self.timestep_spacing!r}; expected one of {SPACINGS}"
      )
    if not _is_int(self.steps_offset) or self.steps_offset < 0:
      raise ValueError(f"steps_offset must be an integer >= 0, got {self.steps_offset!r}")
    if self.karras and not spec.karras:
      with_karras = ", ".join(name for name, sp in SAMPLERS.items() if sp.karras)
      raise ValueError(
        f"karras sigmas are not supported by sampler {self.sampler!r}; samplers with karras "
        f"sigmas: {with_karras}"
      )
    if self.variance is not None and self.variance not in DDPM_VARIANCES:
      raise ValueError(
        f"Unknown DDPM variance {self.variance!r}; expected one of {DDPM_VARIANCES} or None"
      )
    if self.clip_x0 is not None and not self.clip_x0 > 0:
      raise ValueError(f"clip_x0 must be > 0 or None, got {self.clip_x0!r}")
    if self.ddim_step not in DDIM_STEPS:
      raise ValueError(f"Unknown ddim_step {self.ddim_step!r}; expected one of {DDIM_STEPS}")
    if not _is_int(self.lcm_original_steps):
      raise ValueError(f"lcm_original_steps must be an integer, got {self.lcm_original_steps!r}")
    if spec.check is not None:
      spec.check(self, T)

  @classmethod
  def from_config(cls, config: Any, **overrides: Any) -> SamplerSettings:
    """The settings of config.sample, then `overrides` whose value is not None; checked.

    Reads config.sample.{sampler, steps, eta} and, where present, timestep_spacing (else the
    sampler's `SamplerSpec.spacing`), steps_offset, karras, variance, clip_x0,
    set_alpha_to_one, timesteps and sigmas; lcm_original_steps is
    config.distill.num_ddim_timesteps for a distilled model (a `distill` section), else 50.
    Overrides are typically command-line flags (None = not given).
    """
    _check_fields(overrides)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    s = config.sample
    spec = SAMPLERS.get(overrides.get("sampler", s.sampler))
    optional = ("steps_offset", "karras", "variance", "clip_x0", "set_alpha_to_one", "ddim_step")
    kw = dict(
      sampler=s.sampler,
      steps=s.steps,
      eta=s.eta,
      timestep_spacing=s.get("timestep_spacing", spec.spacing if spec else cls.timestep_spacing),
      **{name: s.get(name, getattr(cls, name)) for name in (*optional, "timesteps", "sigmas")},
      lcm_original_steps=(
        config.distill.num_ddim_timesteps if "distill" in config else cls.lcm_original_steps
      ),
    )
    kw.update(overrides)
    settings = cls(**dict(kw, eta=float(kw["eta"])))  # 0 and 0.0: one static jit argument
    settings.check(config.diffusion.num_timesteps)
    return settings


def _check_custom_grid(s: SamplerSettings, spec: SamplerSpec, T: int) -> None:
  """Custom timesteps / sigmas: one ValueError naming the first bad value and its index."""
  if s.timesteps is not None and s.sigmas is not None:
    raise ValueError("give custom timesteps or sigmas, not both")
  if (s.timesteps is not None or s.sigmas is not None) and s.karras:
    raise ValueError("custom timesteps or sigmas replace the grid: they take karras=False")
  if s.sigmas is not None and not spec.custom_sigmas:
    with_sigmas = ", ".join(name for name, sp in SAMPLERS.items() if sp.custom_sigmas)
    raise ValueError(
      f"custom sigmas are not supported by sampler {s.sampler!r}; samplers with custom "
      f"sigmas: {with_sigmas} (others take custom timesteps)"
    )
  if s.timesteps is not None:
    if not s.timesteps:
      raise ValueError("custom timesteps must hold at least one timestep")
    for i, t in enumerate(s.timesteps):
      if not _is_real(t) or not 0 <= t < T:
        raise ValueError(f"custom timesteps[{i}] = {t!r} is outside [0, T={T})")
      if not spec.fractional and not float(t).is_integer():
        fractional = ", ".join(name for name, sp in SAMPLERS.items() if sp.fractional)
        raise ValueError(
          f"custom timesteps[{i}] = {t!r} is not an integer, which sampler {s.sampler!r} "
          f"needs (fractional timesteps: {fractional})"
        )
      if i and not t < s.timesteps[i - 1]:
        raise ValueError(
          f"custom timesteps[{i}] = {t!r} is not below timesteps[{i - 1}] = "
          f"{s.timesteps[i - 1]!r}: they must be strictly decreasing"
        )
  if s.sigmas is not None:
    if len(s.sigmas) < 2:
      raise ValueError("custom sigmas need n + 1 >= 2 values: n noise levels, then the final one")
    for i, k in enumerate(s.sigmas):
      last = i == len(s.sigmas) - 1
      if not _is_real(k) or not math.isfinite(k) or not (k >= 0 if last else k > 0):
        raise ValueError(f"custom sigmas[{i}] = {k!r} must be finite and > 0 (the last one >= 0)")
      if i and not k < s.sigmas[i - 1]:
        raise ValueError(
          f"custom sigmas[{i}] = {k!r} is not below sigmas[{i - 1}] = {s.sigmas[i - 1]!r}: "
          "they must be strictly decreasing"
        )


def _check_fields(kwargs: dict[str, Any]) -> None:
  fields = [f.name for f in dataclasses.fields(SamplerSettings)]
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise TypeError(f"Unknown sampler settings {unknown}; valid ones: {', '.join(fields)}")


def _settings(settings: SamplerSettings | None, kwargs: dict[str, Any]) -> SamplerSettings:
  """`settings` (default: SamplerSettings()) with the fields in kwargs replaced."""
  _check_fields(kwargs)
  return dataclasses.replace(settings or SamplerSettings(), **kwargs)


# ----------------------------------------------------------------------------- driver


def make_predict(
  denoise: Denoise, space: str, prediction: str, learn_sigma: bool, clip_x0: float | None
) -> Predict:
  """Wraps `denoise` to return (x0, eps, v) from a native-space state at an info's point."""

  def predict(x, info):
    a, s = info["a"], info["s"]
    x_vp = x * a if space == "ve" else x
    t = jnp.full((x.shape[0],), info["t"], jnp.float32)
    out = denoise(x_vp, t)
    c = x.shape[-1]
    if learn_sigma:
      if out.shape[-1] != 2 * c:
        raise ValueError(f"learn_sigma=True needs {2 * c} output channels, got {out.shape}")
      out, v = out[..., :c], out[..., c:]
    else:
      if out.shape != x.shape:
        raise ValueError(
          f"denoise output shape {out.shape} != sample shape {x.shape} "
          "(set learn_sigma=True for models with variance channels)"
        )
      v = None
    x0, eps = schedules.to_x0_eps(out, x_vp, a, s, prediction)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      eps = (x_vp - a * x0) / s
    return x0, eps, v

  return predict


def run_plan(
  plan: Plan,
  predict: Predict,
  x: Array,
  *,
  noise: Array | None = None,
  paste: Callable[[Array, dict, Array], Array] | None = None,
  return_trajectory: bool = False,
):
  """Runs every step of `plan` in one `lax.scan` from the native-space state x.

  noise: optional (n, *x.shape) per-step noise (for parity with a reference); otherwise it
  is drawn from infos["key"] (n,) PRNG keys, unless the plan needs none (`needs_noise`
  False: zeros are passed and no PRNG op is traced). paste(x, info, key) edits the state
  after each step.
  Returns x_0, or (x_0, trajectory (n, *x.shape) of the native states after each step).
  """
  infos = dict(plan.infos)
  if noise is not None:
    if noise.shape != (plan.num_steps, *x.shape):
      raise ValueError(
        f"noise must have shape {(plan.num_steps, *x.shape)} (steps, *x.shape), got {noise.shape}"
      )
    infos["noise"] = noise
  draw = plan.needs_noise and noise is None
  if (draw or paste is not None or "renoise" in infos) and "key" not in infos:
    raise ValueError(
      "run_plan draws noise here (the plan's, a paste or RePaint's): it needs per-step PRNG "
      'keys infos["key"] (`_step_keys_and_repaint`)'
    )

  def body(carry, info):
    if draw or paste is not None or "renoise" in info:
      k_step, k_paste, k_renoise = jax.random.split(info["key"], 3)
    if "noise" in info:
      z = info["noise"]
    elif draw:
      z = jax.random.normal(k_step, x.shape, x.dtype)
    else:  # a deterministic plan: the step ignores z
      z = jnp.zeros(x.shape, x.dtype)
    carry = plan.step(carry, info, predict, z)
    if paste is not None:
      carry = dict(carry, x=paste(carry["x"], info, k_paste))
    if "renoise" in info:  # RePaint: go back to this step's start and take it again.
      z = jax.random.normal(k_renoise, x.shape, x.dtype)
      back = editing.renoise(carry["x"], info, z, plan.space)
      carry = dict(carry, x=jnp.where(info["renoise"], back, carry["x"]))
    return carry, (carry["x"] if return_trajectory else None)

  carry, traj = jax.lax.scan(body, plan.init(x), infos)
  if return_trajectory:
    return carry["x"], traj
  return carry["x"]


def build_plan(
  schedule: Schedule,
  settings: SamplerSettings | None = None,
  start: int = 0,
  **setting_kwargs: Any,
) -> Plan:
  """The plan of `settings.sampler` on `settings.steps` grid points of `schedule`.

  settings: checked against schedule.T; `setting_kwargs` (sampler=, steps=, ...) replace
  its fields (default SamplerSettings()). variance None means fixed_small here (`sample`
  resolves it from learn_sigma first).
  start: drop the first `start` grid points (img2img); multistep starts follow the new grid.
  """
  settings = _settings(settings, setting_kwargs)
  settings.check(schedule.T)
  spec = SAMPLERS[settings.sampler]
  grid = spec.grid(schedule, settings)
  return spec.plan({k: v[start:] for k, v in grid.items()}, settings)


def _step_keys_and_repaint(plan: Plan, key: Array, resample: int, sampler: str) -> Plan:
  """The plan with per-scan-step PRNG keys "key" and, for RePaint, repeated steps."""
  infos = dict(plan.infos)
  if resample != 1:
    if not plan.single_step:
      raise ValueError(f"resample (RePaint) needs a sampler without history, not {sampler!r}")
    idx, flags = editing.repaint_indices(plan.num_steps, resample)
    infos = {k: v[idx] for k, v in infos.items()}
    infos["renoise"] = jnp.asarray(flags)
  infos["key"] = jax.random.split(key, infos["t"].shape[0])
  return dataclasses.replace(plan, infos=infos)


def _initial_state(
  plan: Plan, x_T: Array, x_init: Array | None, mask: Array | None, start: int, key: Array
) -> tuple[Array, Callable | None]:
  """The native-space start state and the inpainting paste function (None without a mask)."""
  a0, s0 = plan.infos["a"][0], plan.infos["s"][0]
  if x_init is None or start == 0 and mask is not None:
    x = plan.noise_scale * x_T
  else:  # img2img: noise x_init to the first kept grid point (diffusers' add_noise).
    x = editing.noised(x_init, x_T, a0, s0, plan.space)
  if mask is None:
    return x, None
  mask = editing.check_mask(mask, x_T.shape)
  z = jax.random.normal(key, x_T.shape, x_T.dtype)
  x = mask * editing.noised(x_init, z, a0, s0, plan.space) + (1.0 - mask) * x
  return x, editing.make_paste(x_init, mask, plan.space)


def sample(
  denoise: Denoise,
  x_T: Array,
  key: Array,
  schedule: Schedule,
  settings: SamplerSettings | None = None,
  *,
  prediction: str = "eps",
  learn_sigma: bool = False,
  x_init: Array | None = None,
  strength: float = 1.0,
  mask: Array | None = None,
  resample: int = 1,
  noise: Array | None = None,
  return_trajectory: bool = False,
  **setting_kwargs: Any,
):
  """Draws samples x_0 (B, ...) from x_T ~ N(0, I) (B, ...), every step in one `lax.scan`.

  Args:
    denoise: (x (B, ...) VP-scaled, t (B,) float timesteps) -> model output.
    x_T: unit Gaussian noise, any shape (B, ..., C).
    key: PRNG key for stochastic samplers and editing (unused by deterministic sampling).
    schedule: the training schedule.
    settings: the sampler and its settings (`SamplerSettings`, default SamplerSettings());
      setting_kwargs (sampler=, steps=, eta=, ...) replace its fields, for interactive use.
    prediction: the model's prediction type ("eps", "v", "x0"). learn_sigma: the output has
      2C channels, the last C the variance interpolation (used by ddpm, ignored by others).
    x_init, strength: img2img, start from x_init noised at the last `strength` fraction of
      the grid. mask: inpainting, 1 = keep x_init, same rank as x_T, dims equal or 1.
      resample: RePaint resampling count (with mask; single-step samplers only).
    noise: optional per-step noise (n, *x_T.shape) instead of noise drawn from `key`.
    return_trajectory: also return the native-space states after every scan step
      (n, *x.shape): VP x for ddpm/ddim/dpmpp/unipc/lcm, x / alpha for euler/heun.
  Returns:
    x_0 (B, ...), or (x_0, trajectory). Pure: jit it with the settings static.
  """
  settings = _settings(settings, setting_kwargs)
  settings.check(schedule.T)
  schedules.check_prediction(prediction)
  if settings.variance is None:
    variance = "learned_range" if learn_sigma else "fixed_small"
    settings = dataclasses.replace(settings, variance=variance)
  start = editing.start_index(settings.steps, x_T.shape, x_init, strength, mask, resample)
  plan = build_plan(schedule, settings, start)
  predict = make_predict(denoise, plan.space, prediction, learn_sigma, settings.clip_x0)
  return drive(
    plan, predict, x_T, key, x_init=x_init, mask=mask, start=start, resample=resample,
    sampler=settings.sampler, noise=noise, return_trajectory=return_trajectory,
  )  # fmt: skip


def drive(
  plan: Plan,
  predict: Predict,
  x_T: Array,
  key: Array,
  *,
  x_init: Array | None,
  mask: Array | None,
  start: int,
  resample: int,
  sampler: str,
  noise: Array | None = None,
  return_trajectory: bool = False,
):
  """Runs `plan` from unit noise x_T (or x_init noised at grid point `start`, or inpainting
  with `mask`): per-step keys and RePaint repeats, the start state, then `run_plan`. Shared
  by the discrete and the flow samplers."""
  k_init = key
  if plan.needs_noise or mask is not None:
    # Deterministic sampling without a mask uses no key: no PRNG op is traced.
    k_init, k_steps = jax.random.split(key)
    plan = _step_keys_and_repaint(plan, k_steps, resample, sampler)
  x, paste = _initial_state(plan, x_T, x_init, mask, start, k_init)
  return run_plan(plan, predict, x, noise=noise, paste=paste, return_trajectory=return_trajectory)
