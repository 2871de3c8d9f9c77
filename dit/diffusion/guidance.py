"""Classifier-free guidance as a wrapper around the model: cfg_denoise(...) -> denoise(x, t).

guided = uncond + scale * (cond - uncond) on ALL prediction channels (the original DiT code
guides only the first 3 of 4 latent channels; we do not). With learned sigma the variance
channels are taken from the conditional half, unguided. Options:
  interval: (sigma_lo, sigma_hi) in k-sigma units (sqrt((1 - abar) / abar), as EDM): guide
    only where sigma_lo <= sigma_t <= sigma_hi, elsewhere return the conditional output
    (Kynkaanniemi et al. 2024).
  rescale: phi of Lin et al. 2024, sec. 3.4: blend the guided output with a copy rescaled to
    the per-example std of the conditional output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dit.diffusion.schedules import Schedule

Array = jax.Array


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _double_cond(cond: dict[str, Any] | None, batch: int) -> dict[str, Any]:
  """cond for a batch of 2B: rows [0, B) conditional, rows [B, 2B) with drop=True."""
  cond = dict(cond or {})
  drop = cond.pop("drop", None)
  drop = jnp.zeros((batch,), bool) if drop is None else jnp.asarray(drop, bool)
  out = {k: jnp.concatenate([v, v], axis=0) for k, v in cond.items()}
  out["drop"] = jnp.concatenate([drop, jnp.ones((batch,), bool)], axis=0)
  return out


def sigma_at(schedule: Schedule, t: Array) -> Array:
  """k-sigma at (fractional) timesteps t, interpolated linearly in t."""
  return jnp.interp(t, jnp.arange(schedule.T, dtype=jnp.float32), schedule.sigmas)


def check_interval(interval, schedule: Schedule | None, sigma_fn=None) -> None:
  lo, hi = interval
  if not lo < hi or lo < 0:
    raise ValueError(f"guidance interval must satisfy 0 <= lo < hi, got {interval}")
  if sigma_fn is not None:
    return
  if schedule is None:
    raise ValueError("a guidance interval needs the schedule (to map timesteps to sigmas)")
  if _concrete(schedule.sigmas):
    s = np.asarray(schedule.sigmas)
    s_min, s_max = float(s[0]), float(s[np.isfinite(s)].max())
    if hi < s_min or lo > s_max:
      raise ValueError(
        f"guidance interval {interval} lies outside the schedule's sigma range "
        f"[{s_min:.4g}, {s_max:.4g}]: guidance would never apply"
      )


def cfg_denoise(
  model_fn: Callable[[Array, Array, dict | None], Array],
  cond: dict[str, Any] | None,
  scale: float | Array,
  *,
  interval: tuple[float, float] | None = None,
  schedule: Schedule | None = None,
  rescale: float = 0.0,
  sigma_fn: Callable[[Array], Array] | None = None,
) -> Callable[[Array, Array], Array]:
  """denoise(x, t) applying classifier-free guidance with one model call on a batch of 2B.

  Args:
    model_fn: (x (N, ...), t (N,), cond dict) -> output (N, ..., C_out); cond rows with
      cond["drop"] True use the null condition.
    cond: the conditioning for B rows (e.g. {"label": (B,)}), or None.
    scale: guidance scale w (1 = no guidance; the batch is then not doubled), or one per
      row, (B,) (consistency distillation samples w per example).
    interval: optional (sigma_lo, sigma_hi), see the module docstring; needs `schedule`,
      or `sigma_fn(t) -> k-sigma` for models on another time axis (flow matching).
    rescale: guidance rescale phi in [0, 1].
  """
  if interval is not None:
    check_interval(interval, schedule, sigma_fn)
  if not 0.0 <= rescale <= 1.0:
    raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")

  if not isinstance(scale, int | float) and jnp.ndim(scale) not in (0, 1):
    raise ValueError(f"guidance scale must be a number or (B,), got shape {jnp.shape(scale)}")

  def denoise(x: Array, t: Array) -> Array:
    if isinstance(scale, int | float) and scale == 1.0:
      return model_fn(x, t, cond)
    b, c = x.shape[0], x.shape[-1]
    out = model_fn(
      jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), _double_cond(cond, b)
    )
    out_c, out_u = out[:b], out[b:]
    pc, pu = out_c[..., :c], out_u[..., :c]
    w = jnp.asarray(scale, jnp.float32)
    w = w.reshape(w.shape + (1,) * (x.ndim - w.ndim))
    guided = pu + w * (pc - pu)
    if rescale > 0.0:
      axes = tuple(range(1, x.ndim))
      std_c = jnp.std(pc, axis=axes, keepdims=True)
      std_g = jnp.std(guided, axis=axes, keepdims=True)
      # A constant guided output (std 0) is left as it is rather than divided by zero.
      ratio = jnp.where(std_g > 0, std_c / jnp.where(std_g > 0, std_g, 1.0), 1.0)
      guided = rescale * guided * ratio + (1.0 - rescale) * guided
    if interval is not None:
      sig = sigma_fn(t) if sigma_fn is not None else sigma_at(schedule, t)
      on = (sig >= interval[0]) & (sig <= interval[1])
      guided = jnp.where(on.reshape((b,) + (1,) * (x.ndim - 1)), guided, pc)
    return jnp.concatenate([guided, out_c[..., c:]], axis=-1)

  return denoise
