"""Flow matching through the train loop and the generation library: the objective's times,
target and weights as configured, a tiny configs/digits_flow.py run, and the family checks."""

import contextlib
import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special
import scipy.stats
from conftest import tiny_config

from dit import distill, generate, objectives, train
from dit.cli import UserError
from dit.diffusion import flow as flow_lib

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _objective_inputs(config, n=4096):
  seen = {}

  def apply(params, x_t, model_t, cond):
    seen.update(x_t=x_t, t=model_t / config.flow.time_scale, cond=cond)
    return jnp.zeros_like(x_t)

  objective = objectives.make_objective(config, apply, None)
  x0 = jnp.full((n, 2, 2, 1), 0.5)
  keys = jax.random.split(jax.random.key(0), n)
  loss, _ = objective.loss({}, {"x0": x0, "keys": keys, "label": jnp.zeros((n,), jnp.int32)}, {})
  return objective, loss, seen, x0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_objective_draws_shifted_logit_normal_times_and_regresses_the_velocity(shift):
  config = tiny_config("configs/digits_flow.py", flow__logit_mean=0.3, flow__shift=shift)
  assert objectives.objective_name(config) == "flow_matching"
  _, loss, seen, x0 = _objective_inputs(config)
  t = np.asarray(seen["t"])
  base = scipy.special.expit(scipy.stats.norm(0.3, 1.0).ppf([0.1, 0.5, 0.9]))
  want = shift * base / (1 + (shift - 1) * base)
  np.testing.assert_allclose(np.quantile(t, [0.1, 0.5, 0.9]), want, atol=0.01)
  # x_t = (1 - t) x0 + t eps, and the zero model's loss is the mean of |eps - x0|^2.
  eps = (np.asarray(seen["x_t"]) - (1 - t[:, None, None, None]) * 0.5) / t[:, None, None, None]
  np.testing.assert_allclose(float(loss), np.mean((eps - np.asarray(x0)) ** 2), rtol=1e-3)
  drops = np.asarray(seen["cond"]["drop"]).mean()
  assert abs(drops - config.model.class_dropout_prob) < 0.02


def test_flow_run_trains_and_samples_with_flow_samplers_only(tmp_path):
  config = tiny_config("configs/digits_flow.py")
  workdir = str(tmp_path / "run")
  with contextlib.redirect_stdout(io.StringIO()):
    state = train.train_and_evaluate(config, workdir)
  assert int(state["step"]) == 4
  model, params = generate.load_params(config, workdir)
  x = generate.generate(config, model, params, {"label": jnp.arange(2)}, jax.random.key(0), 2,
                        sampler="heun", steps=3)  # fmt: skip
  assert x.shape == (2, 8, 8, 1) and bool(jnp.all(jnp.isfinite(x)))
  with pytest.raises(UserError, match="flow-matching model.*'ddim' is not a flow sampler.*heun"):
    generate.sampler_settings(config, sampler="ddim")
  eps_config = tiny_config()
  with pytest.raises(UserError, match="'midpoint' is a flow-matching sampler.*discrete-time"):
    generate.sampler_settings(eps_config, sampler="midpoint")
  with pytest.raises(UserError, match="Bad config.flow: Unknown flow interpolant 'cos'"):
    train.check_config(tiny_config("configs/digits_flow.py", flow__interpolant="cos"), 1)
  assert flow_lib.from_config(config).interpolant == "linear"
  config.unlock()
  config.distill = ml_collections.ConfigDict({"teacher_workdir": workdir})
  with pytest.raises(UserError, match="flow-matching models .config.flow. are not supported"):
    distill.check_config(config)
