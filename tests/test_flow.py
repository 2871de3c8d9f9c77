"""Flow matching: interpolants and targets, timestep densities and shifts, the loss, the flow
samplers (parity with diffusers' flow schedulers at every step, convergence order on Gaussian
data, SDE moments, editing) and the errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dit.diffusion import flow as F
from dit.diffusion import flow_samplers as FS
from dit.diffusion import guidance

MU, VAR = 0.5, 0.25  # data ~ N(MU, VAR I)
PATHS = [(i, t) for i in F.INTERPOLANTS for t in F.TARGETS]


# ----------------------------------------------------------------------------- the process


@pytest.mark.parametrize("interpolant", F.INTERPOLANTS)
def test_derivatives_are_those_of_the_coefficients(interpolant):
  flow = F.Flow(interpolant=interpolant)
  t = jnp.linspace(0.05, 0.95, 7)
  da, ds = flow.derivatives(t)
  ga = jax.vmap(jax.grad(lambda u: flow.alpha_sigma(u)[0]))(t)
  gs = jax.vmap(jax.grad(lambda u: flow.alpha_sigma(u)[1]))(t)
  np.testing.assert_allclose(da, ga, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ds, gs, rtol=1e-4, atol=1e-5)
  a, s = flow.alpha_sigma(jnp.asarray([0.0, 1.0]))
  np.testing.assert_allclose(a[0], 1.0, atol=1e-6)  # t = 0 is data ...
  assert s[1] > 0.99 and a[1] < 0.01  # ... and t = 1 (nearly) noise.


@pytest.mark.parametrize("interpolant,target", PATHS)
def test_targets_convert_exactly(interpolant, target):
  flow = F.Flow(interpolant=interpolant, target=target)
  k0, k1 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k0, (4, 3))
  eps = jax.random.normal(k1, (4, 3))
  t = jnp.asarray([0.1, 0.4, 0.7, 0.9])
  x_t = flow.interpolate(x0, eps, t)
  got_x0, got_eps = flow.to_x0_eps(flow.target_of(x0, eps, t), x_t, t)
  np.testing.assert_allclose(got_x0, x0, atol=2e-5)
  np.testing.assert_allclose(got_eps, eps, atol=2e-5)


def test_linear_velocity_and_the_loss():
  flow = F.Flow()
  k0, k1 = jax.random.split(jax.random.key(1))
  x0, eps = jax.random.normal(k0, (3, 2, 2, 1)), jax.random.normal(k1, (3, 2, 2, 1))
  t = jnp.asarray([0.2, 0.5, 0.8])
  np.testing.assert_allclose(flow.target_of(x0, eps, t), eps - x0, atol=1e-6)
  seen = {}

  def model(x_t, model_t):
    seen["x_t"], seen["t"] = x_t, model_t
    return jnp.zeros_like(x_t)

  loss, aux = F.flow_loss(model, flow, x0, t, eps)
  tb = t[:, None, None, None]
  np.testing.assert_allclose(seen["x_t"], (1 - tb) * x0 + tb * eps, atol=1e-6)
  np.testing.assert_allclose(seen["t"], 1000 * t, atol=1e-4)
  np.testing.assert_allclose(loss, jnp.mean((eps - x0) ** 2, axis=(1, 2, 3)), rtol=1e-6)
  # SiT's convention: the model sees 1 - t unscaled and predicts the negated velocity.
  sit = F.Flow(time_scale=1.0, reverse_time=True)
  loss, _ = F.flow_loss(lambda x, mt: x0 - eps, sit, x0, t, eps)
  np.testing.assert_allclose(loss, 0.0, atol=1e-10)
  assert sit.model_time(jnp.float32(0.25)) == pytest.approx(0.75)


def test_time_densities_and_weights():
  key = jax.random.key(2)
  n = 200_000
  ln = np.asarray(F.sample_time(key, (n,), "logit_normal", logit_mean=0.5, logit_std=0.8))
  ref = scipy.special.expit(scipy.stats.norm(0.5, 0.8).ppf([0.1, 0.5, 0.9]))
  np.testing.assert_allclose(np.quantile(ln, [0.1, 0.5, 0.9]), ref, atol=5e-3)
  u = np.asarray(F.sample_time(key, (n,), "uniform"))
  np.testing.assert_allclose(np.asarray(F.sample_time(key, (n,), "mode", mode_scale=0.0)), 1 - u)
  mode = np.asarray(F.sample_time(key, (n,), "mode", mode_scale=1.29))
  assert 0 <= mode.min() and mode.max() <= 1 and abs(np.median(mode) - 0.5) < 0.01
  # Cosmap times have the density that the cosmap weighting puts on uniform times.
  cos = np.asarray(F.sample_time(key, (n,), "cosmap"))
  hist, edges = np.histogram(cos, bins=20, range=(0, 1), density=True)
  mid = jnp.asarray(0.5 * (edges[1:] + edges[:-1]))
  np.testing.assert_allclose(hist, F.loss_weight(mid, "cosmap"), rtol=0.05)
  np.testing.assert_allclose(F.loss_weight(jnp.asarray([0.5]), "sigma_sqrt"), [4.0])


def test_time_shift_is_flux_exponential_shift_and_dynamic_shift_matches_flux():
  t = jnp.linspace(0.01, 1.0, 9)
  mu = 0.8
  flux = np.exp(mu) / (np.exp(mu) + (1 / np.asarray(t) - 1))
  np.testing.assert_allclose(F.shift_time(t, np.exp(mu)), flux, rtol=1e-5)
  assert F.dynamic_shift(256) == pytest.approx(np.exp(0.5))
  assert F.dynamic_shift(4096) == pytest.approx(np.exp(1.15))
  # A shift > 1 spends more of the grid at high noise (SD3 uses 3.0 at 1024px).
  assert float(F.shift_time(jnp.float32(0.5), 3.0)) == pytest.approx(0.75)


def test_bad_flow_settings_name_the_valid_ones():
  with pytest.raises(ValueError, match="interpolant 'cosine'.*linear, gvp, vp"):
    F.Flow(interpolant="cosine")
  with pytest.raises(ValueError, match="target 'score'.*velocity, noise, x0"):
    F.Flow(target="score")
  with pytest.raises(ValueError, match="shift must be a finite number > 0, got -1"):
    F.Flow(shift=-1.0)
  with pytest.raises(ValueError, match="time_sampler 'beta'.*uniform, logit_normal, mode"):
    F.sample_time(jax.random.key(0), (2,), "beta")
  with pytest.raises(ValueError, match="Unknown config.flow keys \\['shfit'\\]"):
    F.check_config({"shfit": 3.0})
  with pytest.raises(ValueError, match="weighting 'snr'"):
    F.check_config({"weighting": "snr"})


# ----------------------------------------------------------------------------- diffusers parity

SHAPE = (2, 4, 4, 3)
COEF = np.array([0.7, -0.4, 1.1], np.float32)


def _velocity(xp, x, t, channel_axis):
  """A deterministic nonlinear 'velocity model' written for jnp and torch (t: model time)."""
  shape = [1] * x.ndim
  shape[channel_axis] = -1
  c = xp.asarray(COEF).reshape(shape) if xp is jnp else xp.from_numpy(COEF).reshape(shape)
  return xp.tanh(c * x + xp.sin(t / 137.0)) - 0.3 * x


def jax_velocity(x, t):
  return _velocity(jnp, x, t.reshape((-1, 1, 1, 1)), -1)


def run_diffusers(torch, sched, x_T):
  """diffusers' loop: scale_model_input, model, step; returns the trajectory (n, NHWC)."""
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_T, -1, 1)))
  x = x * getattr(sched, "init_noise_sigma", 1.0)
  traj = []
  for t in sched.timesteps:
    inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
    out = _velocity(torch, inp, torch.as_tensor(t, dtype=torch.float32), 1)
    x = sched.step(out, t, x).prev_sample
    traj.append(np.moveaxis(x.numpy(), 1, -1))
  return np.stack(traj)


FLOW_CASES = {
  # name: (diffusers class, its kwargs, set_timesteps kwargs, our flow kwargs, our settings)
  "euler_sd3": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {}, {"shift": 3.0},
                {"sampler": "euler", "spacing": "diffusers"}),
  "euler_default": ("FlowMatchEulerDiscreteScheduler", {}, {}, {},
                    {"sampler": "euler", "spacing": "diffusers"}),
  "euler_flux": ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True},
                 {"flux": True}, {"shift": float(np.exp(0.9))}, {"sampler": "euler"}),
  "heun_sd3": ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, {}, {"shift": 3.0},
               {"sampler": "heun", "spacing": "diffusers"}),
  "dpmpp_2m": ("DPMSolverMultistepScheduler",
               {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
               {}, {"shift": 3.0}, {"sampler": "dpmpp_2m", "spacing": "diffusers"}),
  "unipc": ("UniPCMultistepScheduler",
            {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
            {}, {"shift": 3.0}, {"sampler": "unipc", "spacing": "diffusers"}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FLOW_CASES))
def test_parity_with_diffusers_flow_schedulers(name):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  cls_name, ref_kwargs, set_kwargs, flow_kwargs, our = FLOW_CASES[name]
  n = 8
  sched = getattr(diffusers, cls_name)(**ref_kwargs)
  settings = FS.FlowSamplerSettings(steps=n, **our)
  if set_kwargs.get("flux"):  # FluxPipeline: sigmas linspace(1, 1/n, n) and mu.
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=0.9)
  else:
    sched.set_timesteps(n)
  flow = F.Flow(**flow_kwargs)
  plan = FS.build_plan(flow, settings)
  np.testing.assert_allclose(plan.infos["t"], sched.timesteps.numpy(), rtol=1e-5, atol=1e-3)

  x_T = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
  ref = run_diffusers(torch, sched, x_T)
  sample = jax.jit(functools.partial(FS.sample, jax_velocity, flow=flow, settings=settings,
                                     return_trajectory=True))  # fmt: skip
  x, traj = sample(x_T=jnp.asarray(x_T), key=jax.random.key(0))
  assert traj.shape == ref.shape
  np.testing.assert_allclose(traj, ref, atol=2e-5, rtol=0)
  np.testing.assert_allclose(x, ref[-1], atol=2e-5, rtol=0)


def test_custom_sigmas_are_shifted_like_diffusers_and_checked():
  sigmas = (1.0, 0.7, 0.4, 0.1)
  s = FS.FlowSamplerSettings(steps=4, sigmas=sigmas)
  tau, _ = FS.flow_times(F.Flow(shift=3.0), s)
  np.testing.assert_allclose(tau, F.shift_time(np.asarray(sigmas), 3.0), rtol=1e-6)
  with pytest.raises(ValueError, match="0.7 at index 2 follows 0.4"):
    FS.FlowSamplerSettings(steps=4, sigmas=(1.0, 0.4, 0.7, 0.1)).check()
  with pytest.raises(ValueError, match="custom sigma 1.5 at index 0 is outside"):
    FS.FlowSamplerSettings(steps=2, sigmas=(1.5, 0.1)).check()


# ----------------------------------------------------------------------------- analytic case


def _ode_error(flow, sampler, steps, x_T):
  settings = FS.FlowSamplerSettings(sampler=sampler, steps=steps)
  x = FS.sample(F.gaussian_model(flow, MU, VAR), x_T, jax.random.key(0), flow, settings)
  t0 = float(FS.flow_times(flow, settings)[0][0])
  exact = F.gaussian_ode_solution(flow, x_T, t0, MU, VAR)
  return float(np.sqrt(np.mean((np.asarray(x, np.float64) - exact) ** 2)))


@pytest.mark.parametrize(
  "interpolant,sampler,order,steps",
  [
    ("linear", "euler", 1, 10),
    ("linear", "heun", 2, 10),
    ("linear", "midpoint", 2, 10),
    ("gvp", "heun", 2, 10),
    ("vp", "midpoint", 2, 10),
    # The multistep solvers take one huge log-SNR step from t = 1; they reach their order
    # once the rest of the grid is fine.
    ("linear", "dpmpp_2m", 2, 40),
    ("linear", "unipc", 2, 40),
  ],
)
def test_ode_error_decreases_at_the_samplers_order(interpolant, sampler, order, steps):
  flow = F.Flow(interpolant=interpolant)
  x_T = jax.random.normal(jax.random.key(1), (256, 1))
  e1, e2 = _ode_error(flow, sampler, steps, x_T), _ode_error(flow, sampler, 2 * steps, x_T)
  rate = np.log2(e1 / e2)
  if order == 1:
    assert 0.8 < rate < 1.3, (e1, e2, rate)
  else:
    assert rate > 1.5, (e1, e2, rate)


@pytest.mark.parametrize("target", ["noise", "x0"])
def test_other_targets_sample_the_same_ode(target):
  flow = F.Flow(target=target)
  x_T = jax.random.normal(jax.random.key(1), (256, 1))
  assert _ode_error(flow, "heun", 20, x_T) < 5e-3


def test_sde_sampler_moments_match_the_data():
  flow = F.Flow()
  x_T = jax.random.normal(jax.random.key(3), (4096, 1))
  for form in ("sigma", "SBDM"):
    f = F.Flow(eps=1e-3) if form == "SBDM" else flow
    settings = FS.FlowSamplerSettings(sampler="euler_maruyama", steps=100, diffusion_form=form)
    x = np.asarray(FS.sample(F.gaussian_model(f, MU, VAR), x_T, jax.random.key(4), f, settings))
    assert abs(x.mean() - MU) < 0.03, form
    assert abs(x.var() / VAR - 1) < 0.08, (form, x.var())


def test_deterministic_flow_samplers_draw_no_noise():
  # Noise drawn and not used still costs compile and run time.
  flow = F.Flow()
  velocity = lambda x, t: jnp.tanh(x + t[:, None] / 1000.0)
  for name, spec in FS.FLOW_SAMPLERS.items():
    run = functools.partial(FS.sample, velocity, key=jax.random.key(0), flow=flow, steps=3)
    jaxpr = str(jax.make_jaxpr(lambda x, n=name, r=run: r(x, sampler=n))(jnp.zeros((2, 1))))
    assert ("random_bits" in jaxpr) == (not spec.deterministic), name


# ----------------------------------------------------------------------------- editing, guidance


def test_img2img_and_inpainting_with_flow_samplers():
  flow = F.Flow()
  model = F.gaussian_model(flow, MU, VAR)
  x_T = jax.random.normal(jax.random.key(5), (4, 2, 2, 1))
  x_init = jnp.full((4, 2, 2, 1), 0.9)
  # Keep-everything mask: the result is x_init exactly, for every sampler.
  for name in FS.FLOW_SAMPLERS:
    out = FS.sample(model, x_T, jax.random.key(6), flow, sampler=name, steps=4,
                    x_init=x_init, mask=jnp.ones((4, 2, 2, 1)))  # fmt: skip
    np.testing.assert_allclose(out, x_init, atol=1e-5, err_msg=name)
  # img2img at low strength stays near x_init; at strength 1 it is plain sampling.
  near = FS.sample(model, x_T, jax.random.key(6), flow, steps=8, x_init=x_init, strength=0.25)
  far = FS.sample(model, x_T, jax.random.key(6), flow, steps=8, x_init=x_init, strength=1.0)
  plain = FS.sample(model, x_T, jax.random.key(6), flow, steps=8)
  assert float(jnp.abs(near - x_init).mean()) < float(jnp.abs(far - x_init).mean())
  np.testing.assert_allclose(far, plain, atol=1e-5)


def test_guidance_interval_uses_the_flow_noise_level():
  flow = F.Flow()
  calls = []

  def model_fn(x, t, cond):
    calls.append(t)
    return jnp.where(cond["drop"][:, None], 0.0, 1.0) * jnp.ones_like(x)

  denoise = guidance.cfg_denoise(model_fn, {}, 3.0, interval=(0.5, 2.0), sigma_fn=flow.k_sigma)
  x = jnp.zeros((2, 1))
  # k-sigma = t / (1 - t): 1.0 at t = 0.5 (inside), 9 at t = 0.9 (outside: conditional output).
  np.testing.assert_allclose(denoise(x, jnp.full((2,), 500.0)), 3.0)
  np.testing.assert_allclose(denoise(x, jnp.full((2,), 900.0)), 1.0)


def test_settings_errors_and_config():
  with pytest.raises(ValueError, match="'ddim' is a sampler for discrete-time diffusion"):
    FS.FlowSamplerSettings(sampler="ddim").check()
  with pytest.raises(ValueError, match="diffusion_form 'brownian'"):
    FS.FlowSamplerSettings(sampler="euler_maruyama", diffusion_form="brownian").check()
  with pytest.raises(ValueError, match="Unknown flow spacing 'linspace'"):
    FS.FlowSamplerSettings(spacing="linspace").check()
  assert "euler_maruyama" in FS.describe()
  hash(FS.FlowSamplerSettings(sigmas=(1.0, 0.5), steps=2))  # A static jit argument.
