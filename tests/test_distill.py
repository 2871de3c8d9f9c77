"""Consistency distillation (LCM): boundary conditions, the objective, the student's start,
the train loop (one step, a run, resume), LCM sampling of the student, and bad input."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_parallel
from conftest import ROOT, tiny_config

from dit import distill, generate, optim, train
from dit.cli import UserError
from dit.diffusion import consistency, samplers, schedules
from dit.models import dit as dit_model
from dit.objectives import distillation

pytestmark = pytest.mark.usefixtures("compilation_cache")

LCM = "configs/digits_lcm.py"


def student_config(teacher_workdir, **overrides):
  return tiny_config(LCM, **{"distill.teacher_workdir": teacher_workdir, **overrides})


def tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


# ---------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("prediction", schedules.PREDICTIONS)
def test_boundary_conditions(prediction):
  """c_skip(0) = 1, c_out(0) = 0: the consistency function is the identity at t = 0 whatever
  the model says; at large t it is the model's x0."""
  c_skip, c_out = consistency.boundary_conditions(jnp.asarray([0, 19, 999]))
  assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
  assert float(c_skip[2]) < 1e-6 and float(c_out[2]) == pytest.approx(1.0, abs=1e-6)
  assert np.all(np.diff(np.asarray(c_skip)) < 0) and np.all(np.diff(np.asarray(c_out)) > 0)

  schedule = schedules.make_schedule()
  kx, ko = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (3, 4, 4, 1))
  out = jax.random.normal(ko, (3, 4, 4, 1))
  f0 = consistency.consistency_fn(out, x, jnp.zeros((3,), jnp.int32), schedule, prediction)
  np.testing.assert_array_equal(f0, x)
  t = jnp.full((3,), 999, jnp.int32)
  x0, _ = schedules.to_x0_eps(
    out,
    x,
    schedule.sqrt_alphas_cumprod[999],
    schedule.sqrt_one_minus_alphas_cumprod[999],
    prediction,
  )
  ft = consistency.consistency_fn(out, x, t, schedule, prediction)
  np.testing.assert_allclose(ft, x0, atol=1e-4 * float(jnp.abs(x0).max()))


def test_distillation_grid_is_the_lcm_samplers():
  grid = consistency.ddim_timesteps(1000, 50)
  np.testing.assert_array_equal(grid[:3], [19, 39, 59])
  assert grid[-1] == 999 and len(grid) == 50
  for steps in range(1, samplers.LCM_MAX_STEPS + 1):
    assert set(samplers.lcm_timesteps(1000, steps, 50)) <= set(grid)
  with pytest.raises(ValueError, match="num_ddim_timesteps must be in"):
    consistency.ddim_timesteps(1000, 0)


def test_teacher_step_is_the_ddim_sampler_step():
  """x_s of the objective is one step of the DDIM sampler (parity-tested against diffusers)
  from t_n to t_n - T/N, with the guided teacher; at s = 0 the target is x_s itself."""
  schedule = schedules.make_schedule()
  teacher = schedules.gaussian_eps_predictor(schedule, 0.5, 0.25)
  x0 = jax.random.uniform(jax.random.key(0), (4, 2, 2, 1), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  index = jnp.asarray([0, 1, 10, 49])
  loss, aux = consistency.distillation_loss(
    teacher, teacher, teacher, x0, schedule, index=index, noise=noise, distance="l2"
  )
  np.testing.assert_array_equal(aux["t"], [19, 39, 219, 999])
  np.testing.assert_array_equal(aux["s"], [0, 19, 199, 979])
  for i in range(4):
    t, s = int(aux["t"][i]), int(aux["s"][i])
    plan = samplers.ddim_plan(samplers._grid_from_timesteps(schedule, np.asarray([t, s])))
    predict = samplers.make_predict(teacher, "vp", "eps", False, None)
    x_t = schedules.q_sample(schedule, x0[i : i + 1], jnp.asarray([t]), noise[i : i + 1])
    info = {k: v[0] for k, v in plan.infos.items()}
    expected = plan.step({"x": x_t}, info, predict, jnp.zeros_like(x_t))["x"]
    np.testing.assert_allclose(aux["x_s"][i : i + 1], expected, atol=1e-5)
  # index 0: s = 0, so target = x_s and the loss is |f(x_t, t) - x_s|^2.
  x_t = schedules.q_sample(schedule, x0[:1], aux["t"][:1], noise[:1])
  f = consistency.consistency_fn(teacher(x_t, aux["t"][:1]), x_t, aux["t"][:1], schedule, "eps")
  np.testing.assert_allclose(loss[0], jnp.mean((f - aux["x_s"][:1]) ** 2), rtol=1e-5)


def test_teacher_solvers_on_gaussian_data():
  """For x0 ~ N(mu, var) the exact ODE map from t to s is affine. The local error of one
  step is O(h^2) for DDIM and O(h^3) for DPM-Solver++(2S): a 5x longer step multiplies
  them by about 25 and 125."""
  mu, var = 0.5, 0.25
  schedule = schedules.make_schedule()
  teacher = schedules.gaussian_eps_predictor(schedule, mu, var)
  x_t = jax.random.normal(jax.random.key(0), (256, 1, 1, 1))
  t = jnp.full((256,), 500, jnp.int32)
  a = lambda i: np.float64(schedule.sqrt_alphas_cumprod[i])
  sig = lambda i: np.float64(schedule.sqrt_one_minus_alphas_cumprod[i])
  errors = {}
  for skip in (20, 100):
    s = 500 - skip
    scale = np.sqrt(a(s) ** 2 * var + sig(s) ** 2) / np.sqrt(a(500) ** 2 * var + sig(500) ** 2)
    exact = a(s) * mu + scale * (np.asarray(x_t, np.float64) - a(500) * mu)
    for solver in consistency.SOLVERS:
      x_s = consistency.teacher_step(teacher, x_t, t, t - skip, schedule, "eps", solver)
      errors[solver, skip] = float(np.sqrt(np.mean((np.asarray(x_s) - exact) ** 2)))
  for skip in (20, 100):
    assert errors["dpmpp_2s", skip] < 0.15 * errors["ddim", skip], errors
  assert 15 < errors["ddim", 100] / errors["ddim", 20] < 50, errors
  assert errors["dpmpp_2s", 100] / errors["dpmpp_2s", 20] > 70, errors
  with pytest.raises(ValueError, match="Unknown consistency solver 'euler'"):
    consistency.teacher_step(teacher, x_t, t, t - 1, schedule, "eps", "euler")


def test_huber_and_l2_distances():
  schedule = schedules.make_schedule()
  zero = lambda x, t: jnp.zeros_like(x)
  shift = lambda x, t: jnp.full_like(x, 0.3)  # A student that disagrees with the target.
  x0 = jnp.zeros((2, 2, 2, 1))
  kw = dict(index=jnp.asarray([5, 30]), noise=jnp.ones_like(x0))
  l2, _ = consistency.distillation_loss(shift, zero, zero, x0, schedule, distance="l2", **kw)
  hub, _ = consistency.distillation_loss(
    shift, zero, zero, x0, schedule, distance="huber", huber_c=0.001, **kw
  )
  assert np.all(np.asarray(l2) > 0)
  d = np.sqrt(np.asarray(l2))  # All elements differ by the same amount here.
  np.testing.assert_allclose(hub, np.sqrt(d**2 + 1e-6) - 1e-3, rtol=1e-4)
  with pytest.raises(ValueError, match="Unknown consistency distance 'l1'"):
    consistency.distillation_loss(shift, zero, zero, x0, schedule, distance="l1", **kw)


# ---------------------------------------------------------------------------- the student


def tiny_models(teacher_workdir="unused"):
  config = student_config(teacher_workdir)
  student = dit_model.build_model(config.model)
  teacher = dit_model.build_model(dict(config.model, guidance_embedding=False))
  return config, student, teacher


def test_student_starts_as_the_teacher():
  """The student made from the teacher's params computes the teacher's conditional output
  for every guidance scale (its guidance embedder's output layer starts at zero)."""
  config, student, teacher = tiny_models()
  x, t, cond = dit_model.example_inputs(teacher, 4)
  x = jax.random.normal(jax.random.key(0), x.shape)
  t = jnp.asarray([0.0, 10.0, 500.0, 999.0])
  cond = {"label": jnp.asarray([0, 3, 5, 9])}
  t_params = teacher.init(jax.random.key(1), x, t, cond)["params"]
  fresh = student.init(jax.random.key(2), x, t, dict(cond, guidance=jnp.ones(4)))["params"]
  assert set(fresh) - set(t_params) == {"w_embedder"}
  params = distill.student_params(fresh, t_params)
  ref = teacher.apply({"params": t_params}, x, t, cond)
  for w in (1.0, 4.0, 7.5):
    out = student.apply({"params": params}, x, t, dict(cond, guidance=jnp.full((4,), w)))
    np.testing.assert_array_equal(out, ref)
  with pytest.raises(ValueError, match=r"needs cond\['guidance'\]"):
    student.apply({"params": params}, x, t, cond)
  bad = dict(t_params, final_layer=jax.tree.map(lambda a: a[..., :1], t_params["final_layer"]))
  with pytest.raises(UserError, match="do not fit the student in modules \\['final_layer'\\]"):
    distill.student_params(fresh, bad)


@pytest.mark.slow  # About 14 s.
def test_distillation_step_decreases_its_loss_on_a_fixed_batch():
  """The train loop's update step in distillation mode, on one fixed batch (same t, noise
  and w every step): the consistency loss falls well below its start."""
  config, student, teacher = tiny_models()
  config.unlock()
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 0
  tx, lr = optim.make_optimizer(config)
  schedule = schedules.make_schedule()
  x = jnp.zeros((1, 8, 8, 1))
  t_params = teacher.init(jax.random.key(1), x, jnp.zeros(1), {"label": jnp.zeros(1, int)})
  t_params = t_params["params"]
  objective = distillation.from_teacher(
    config, train.make_apply(student), schedule, teacher, t_params
  )
  update = jax.jit(train.make_update_fn(config, objective.loss, tx, lr, None))
  state = jax.jit(lambda fr: train.init_state(config, student, tx, objective, fr))(objective.frozen)
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.uniform(-1, 1, (8, 8, 8, 1)), jnp.float32),
    "label": jnp.arange(8, dtype=jnp.int32),
  }
  losses = []
  for _ in range(60):
    state = dict(state, step=jnp.zeros((), jnp.int32))
    state, metrics = update(state, batch, objective.frozen)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-5:])


# ---------------------------------------------------------------------------- a distillation run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny teacher (4 steps), then its student (4 steps, checkpoints at 2 and 4)."""
  root = tmp_path_factory.mktemp("distill")
  teacher, student = str(root / "teacher"), str(root / "student")
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    train.train_and_evaluate(tiny_config(), teacher)
    state = train.train_and_evaluate(student_config(teacher), student)
  return teacher, student, jax.device_get(state)


def test_student_run_writes_a_checkpoint_that_restores(runs):
  teacher, student, state = runs
  assert sorted(os.listdir(os.path.join(student, "ckpt"))) == ["2", "4"]
  with open(os.path.join(student, "config.json")) as f:
    saved = json.load(f)
  assert saved["distill"]["teacher_workdir"] == teacher
  assert saved["model"]["guidance_embedding"] is True
  model, params = generate.load_params(student_config(teacher), student)
  assert model.guidance_embedding
  tree_equal(params, state["ema_params"])
  # The student moved away from the teacher.
  _, t_params = generate.load_params(tiny_config(), teacher)
  assert not np.allclose(
    params["final_layer"]["linear"]["kernel"], t_params["final_layer"]["linear"]["kernel"]
  )


def test_student_resume_is_bit_exact(runs, tmp_path):
  teacher, student, state = runs
  workdir = str(tmp_path / "student")
  shutil.copytree(student, workdir)
  shutil.rmtree(os.path.join(workdir, "ckpt", "4"))
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    resumed = train.train_and_evaluate(student_config(teacher), workdir)
  tree_equal(jax.device_get(resumed), state)


@pytest.mark.slow  # About 14 s; the default run's budget.
def test_lcm_sampling_of_the_student(runs, tmp_path):
  """dit.sample --sampler=lcm --steps=1..8 from the student's workdir (config.json)."""
  _, student, _ = runs
  config = student_config(runs[0])
  model, params = generate.load_params(config, student)
  cond = generate.label_cond(config, np.arange(4) % 10)
  key = jax.random.key(0)
  one = generate.generate(config, model, params, cond, key, 4, steps=1)
  two = generate.generate(config, model, params, cond, key, 4, steps=2)
  assert one.shape == (4, 8, 8, 1) and np.all(np.isfinite(one))
  assert not np.allclose(one, two)
  with pytest.raises(UserError, match=r"--steps for the LCM sampler must be in \[1, 8\], got 9"):
    generate.generate(config, model, params, cond, key, 4, sampler="lcm", steps=9)
  with pytest.raises(UserError, match=r"--steps must be in \[1, 1000\], got 0"):
    generate.generate(config, model, params, cond, key, 4, sampler="lcm", steps=0)
  out = tmp_path / "lcm.png"
  cmd = [sys.executable, "-m", "dit.sample", f"--workdir={student}", "--sampler=lcm"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
    [*cmd, "--steps=2", "--num=10", f"--out={out}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr
  assert out.exists()
  done = subprocess.run(
    [*cmd, "--steps=12", f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert done.returncode == 2 and "must be in [1, 8], got 12" in done.stderr
  assert "Traceback" not in done.stderr


@pytest.mark.slow  # The frozen inputs use the state's sharding rules (test_parallel).
def test_mesh_with_sharded_teacher_matches_one_device(runs, tmp_path, compilation_cache):
  """The student on a 2-device FSDP mesh (teacher params sharded by the same rules) ends
  where the one-device pmap run did, up to float summation order."""
  teacher, _, state = runs
  mesh = {"parallelism": "mesh", "mesh.data": 1, "mesh.fsdp": 2, "mesh.fsdp_min_size": 256}
  student = {"config_file": LCM, "distill.teacher_workdir": teacher, **mesh}
  workdirs = test_parallel.run_devices({"fsdp2": student}, tmp_path, 2, compilation_cache)
  got = test_parallel.load_npz(workdirs["fsdp2"])
  test_parallel.assert_params_close(got, test_parallel.flat_params(state["params"]), atol=1e-5)


# ---------------------------------------------------------------------------- bad input


def test_teacher_that_does_not_match_names_the_fields(runs, tmp_path):
  teacher, _, _ = runs
  config = student_config(teacher, **{"model.depth": 2, "diffusion.prediction": "v"})
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  msg = str(e.value)
  assert "model.depth: teacher 1, student 2" in msg
  assert "diffusion.prediction: teacher 'eps', student 'v'" in msg
  # Compute settings may differ (the teacher runs with the student's).
  tconfig = distill.teacher_config(student_config(teacher, **{"model.dtype": "bfloat16"}))
  assert tconfig.model.dtype == "bfloat16" and not tconfig.model.guidance_embedding


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"distill.teacher_workdir": ""}, "config.distill.teacher_workdir is empty"),
    ({"model.guidance_embedding": False}, "needs config.model.guidance_embedding=True"),
    ({"distill.guidance_min": 5.0, "distill.guidance_max": 2.0}, "guidance_min/max must"),
    ({"distill.num_ddim_timesteps": 0}, "num_ddim_timesteps must be in [1, 1000], got 0"),
    ({"distill.distance": "l1"}, "distance must be one of ('huber', 'l2'), got 'l1'"),
    ({"distill.solver": "heun"}, "solver must be one of ('ddim', 'dpmpp_2s'), got 'heun'"),
  ],
)
def test_bad_distill_config(tmp_path, overrides, message):
  config = student_config(str(tmp_path / "teacher"), **overrides)
  with pytest.raises(UserError, match=re.escape(message)):
    train.check_config(config, 1)


def test_missing_teacher(tmp_path):
  with pytest.raises(UserError, match="has no config.json"):
    distill.load_teacher(student_config(str(tmp_path / "nowhere")))


def test_lcm_plan_steps():
  schedule = schedules.make_schedule()
  for steps in (0, 9):
    with pytest.raises(ValueError, match=r"LCM sampling takes 1 to 8 steps|steps must be in"):
      samplers.build_plan(schedule, sampler="lcm", steps=steps)
  assert samplers.build_plan(schedule, sampler="lcm", steps=8).num_steps == 8


@pytest.mark.parametrize("base", ["digits", "imagenet256_dit:S/2", "t2i_pixart"])
def test_generic_lcm_config(base):
  """configs/lcm.py:<config> is that config plus guidance embedding, distill and LCM sampling."""
  from dit.cli import load_config

  name, _, arg = base.partition(":")
  teacher = load_config(str(ROOT / f"configs/{name}.py") + (f":{arg}" if arg else ""))
  config = load_config(str(ROOT / f"configs/lcm.py:{base}"))
  assert config.model.guidance_embedding and config.sample.sampler == "lcm"
  assert config.optim.ema_decay == 0.95 and not config.optim.ema_warmup
  assert config.distill.num_ddim_timesteps == 50 and config.distill.teacher_workdir == ""
  same = dict(config.model)
  same.pop("guidance_embedding")
  assert same == dict(teacher.model) and dict(config.diffusion) == dict(teacher.diffusion)
  with pytest.raises(UserError, match="teacher_workdir is empty"):
    train.check_config(config, 1)
  with pytest.raises(UserError, match="no teacher config"):
    load_config(str(ROOT / "configs/lcm.py:nosuch"))
