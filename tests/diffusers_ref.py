"""The diffusers side of the sampler parity tests: a toy model written once for jnp and torch,
a diffusers scheduler loop with the noise it draws fed in, and the map from a diffusers
scheduler config to our `SamplerSettings`. Importing this module needs no torch."""

import importlib
import inspect

import jax.numpy as jnp
import numpy as np

from dit.diffusion import samplers

SHAPE = (2, 4, 4, 3)  # NHWC; diffusers sees (2, 3, 4, 4)
COEF = np.array([0.7, -0.4, 1.1], np.float32)  # per-channel, so layouts must line up
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _dummy(xp, x, t, channel_axis):
  """A deterministic nonlinear 'model' written for both jnp and torch."""
  shape = [1] * x.ndim
  shape[channel_axis] = -1
  c = xp.asarray(COEF).reshape(shape) if xp is jnp else xp.from_numpy(COEF).reshape(shape)
  return xp.tanh(c * x + 0.5 * xp.sin(t / 137.0)) + 0.05 * x


def jax_model(learn_sigma=False):
  """denoise(x (B, H, W, C), t (B,)) -> (B, H, W, C) or (B, H, W, 2C)."""

  def denoise(x, t):
    tt = t.reshape((-1,) + (1,) * (x.ndim - 1))
    out = _dummy(jnp, x, tt, -1)
    if learn_sigma:
      out = jnp.concatenate([out, jnp.tanh(0.3 * x + tt / 1000.0)], axis=-1)
    return out

  return denoise


def torch_model(torch, learn_sigma=False):
  """The same model on (B, C, H, W) torch tensors and a scalar timestep."""

  def model(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    out = _dummy(torch, x, t, 1)
    if learn_sigma:
      out = torch.cat([out, torch.tanh(0.3 * x + t / 1000.0)], dim=1)
    return out

  return model


def to_torch(torch, a):
  """NHWC numpy -> NCHW torch."""
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))


def run_diffusers(torch, monkeypatch, sched, x0, noises, learn_sigma=False, **step_kw):
  """Runs a diffusers scheduler loop from x0 (NCHW), feeding noises[i] (NCHW) to whatever it
  draws at step i. Returns the states after each step (n, B, H, W, C)."""
  module = importlib.import_module(type(sched).__module__)
  state = {"i": 0}
  monkeypatch.setattr(
    module, "randn_tensor", lambda *a, **k: noises[state["i"]].clone(), raising=False
  )
  model = torch_model(torch, learn_sigma)
  x, traj = x0, []
  for i, t in enumerate(sched.timesteps):
    state["i"] = i
    out = model(sched.scale_model_input(x, t), t)
    x = sched.step(out, t, x, **step_kw).prev_sample
    traj.append(x.numpy())
  return np.moveaxis(np.stack(traj), 2, -1)


def make_scheduler(diffusers, cls_name: str, **config):
  """diffusers.<cls_name>(**config), the keys it does not take dropped (Stable Diffusion's
  config names set_alpha_to_one and clip_sample, which only some schedulers have)."""
  cls = getattr(diffusers, cls_name)
  params = inspect.signature(cls.__init__).parameters
  return cls(**{k: v for k, v in config.items() if k in params})


def settings_of(sched, sampler: str, steps: int, **extra) -> tuple[samplers.SamplerSettings, dict]:
  """Our settings for a diffusers scheduler's config, and the model keywords of `sample`
  (prediction, learn_sigma)."""
  c = sched.config
  kw = dict(
    sampler=sampler,
    steps=steps,
    timestep_spacing=c.get("timestep_spacing", "leading"),
    steps_offset=c.get("steps_offset", 0),
    set_alpha_to_one=c.get("set_alpha_to_one", True),
    karras=bool(c.get("use_karras_sigmas", False)),
    clip_x0=float(c.clip_sample_range) if c.get("clip_sample", False) else None,
  )
  if sampler == "lcm":
    kw["lcm_original_steps"] = c.original_inference_steps
  if sampler == "ddim":
    kw["ddim_step"] = "diffusers"
  learn_sigma = c.get("variance_type") == "learned_range"
  if sampler == "ddpm":
    kw["variance"] = c.variance_type
  kw.update(extra)
  model = dict(prediction=PREDICTIONS[c.prediction_type], learn_sigma=learn_sigma)
  return samplers.SamplerSettings(**kw), model
