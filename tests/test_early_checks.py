"""Every command checks its inputs before any slow work: one line, exit 2, in the user's terms.

The commands run in this process (`run_command_here`: the command's own flags in a fresh
FlagValues, then its main through dit.cli's one-line error path), on a tiny random digits
model written as step 0 of a workdir (`tiny_workdir`). A check "before any slow work" is
shown by making the checkpoint restore fail the test if it is reached.
"""

import json
import os
import re
import sys

import jax
import numpy as np
import pytest
from absl import flags
from conftest import ROOT, tiny_config
from PIL import Image

from dit import checkpoint, cli, evaluate, generate, info, optim, sample, train
from dit.cli import UserError
from dit.models import dit as dit_model

DIGITS = ROOT / "configs/digits.py"
SAMPLE_NUM = 6  # config.sample.num of the tiny workdir: dit-sample's default --num.


def run_command_here(module, *args, monkeypatch, capsys) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of `python -m module args`, run in this process."""
  flag_values = flags.FlagValues()
  module.define_flags(flag_values)
  monkeypatch.setattr(module, "FLAGS", flag_values)
  argv = [module.__name__, *map(str, args)]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags finds --config.KEY overrides here.
  notes = getattr(module, "help_notes", lambda: "")
  help = lambda: cli.help_text(module.__doc__, flag_values, list(flag_values), notes())
  code = 0
  try:
    cli.call_main(module.main, cli.parse_flags(argv, flag_values, help=help))
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def random_params(model, seed: int = 0):
  """Params of `model` drawn from N(0, 0.02^2), every leaf non-zero (DiT zero-inits adaLN
  and its final layer, which would make every sample the same function of the noise)."""
  rng = np.random.default_rng(seed)
  shapes = dit_model.abstract_params(model)
  return jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(np.float32), shapes)


def write_tiny_workdir(workdir, config_file: str = "configs/digits.py", **overrides) -> str:
  """A tiny random model of `config_file` as step 0 of `workdir` (config.json + ckpt/0)."""
  config = tiny_config(config_file, **{"sample.num": SAMPLE_NUM, **overrides})
  tx, _ = optim.make_optimizer(config)
  params = random_params(dit_model.build_model(config.model))
  return checkpoint.write_params(params, config, tx, str(workdir))


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  return write_tiny_workdir(tmp_path_factory.mktemp("early") / "run")


@pytest.fixture(scope="module")
def loaded(tiny_workdir):
  """(config, model, params) of the tiny workdir (module scope: read before `no_restore`)."""
  return generate.load(tiny_workdir)


@pytest.fixture
def run(monkeypatch, capsys):
  return lambda module, *args: run_command_here(
    module, *args, monkeypatch=monkeypatch, capsys=capsys
  )


@pytest.fixture
def no_restore(monkeypatch):
  """Fails the test if a checkpoint is read: the check must come first."""

  def restore(*args, **kwargs):
    raise AssertionError("the checkpoint was read before the inputs were checked")

  monkeypatch.setattr(checkpoint, "restore_params", restore)


def one_line(code, err, *fragments):
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


# ---- Output paths ---------------------------------------------------------------------------


def test_out_in_a_missing_directory_is_created(tiny_workdir, tmp_path, run):
  out = tmp_path / "new" / "dir" / "samples.npz"
  code, stdout, err = run(sample, f"--workdir={tiny_workdir}", f"--out={out}", "--steps=2")
  assert code == 0, err
  assert f"wrote {out}" in stdout
  # The default --num is config.sample.num (not 64): the grid's rows stay one per class.
  assert np.load(out)["images"].shape == (SAMPLE_NUM, 8, 8, 1)


@pytest.mark.parametrize("case", ["parent is a file", "no extension", "a directory"])
def test_unwritable_out_is_refused_before_sampling(tiny_workdir, tmp_path, run, no_restore, case):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  out, message = {
    "parent is a file": (blocker / "grid.png", "cannot be written"),
    "no extension": (tmp_path / "grid", "name an .npz (uint8 images) or an image file"),
    "a directory": (tmp_path / "d.png", "is a directory"),
  }[case]
  if case == "a directory":
    out.mkdir()
  code, _, err = run(sample, f"--workdir={tiny_workdir}", f"--out={out}")
  one_line(code, err, f"--out {str(out)!r}", message)


def test_eval_json_unwritable_is_refused_before_sampling(tmp_path, run, no_restore):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(tiny_config().to_json())
  (workdir / "eval.json").mkdir()  # Unwritable even for root.
  code, _, err = run(evaluate, f"--workdir={workdir}")
  one_line(code, err, f"{workdir}/eval.json cannot be written", "directory")


# ---- Sampler and model -----------------------------------------------------------------------


def test_lcm_needs_a_distilled_model(tiny_workdir, run, no_restore):
  code, _, err = run(sample, f"--workdir={tiny_workdir}", "--sampler=lcm")
  one_line(code, err, "The lcm sampler needs a consistency-distilled model", "ddim")
  config = tiny_config()
  with pytest.raises(UserError, match="consistency-distilled"):
    generate.sampler_settings(config, sampler="lcm")
  with config.unlocked():  # A distilled model's config has a distill section.
    config.distill = {"num_ddim_timesteps": 50}
  assert generate.sampler_settings(config, sampler="lcm", steps=2).sampler == "lcm"


def test_sampler_of_the_other_family_and_karras(tiny_workdir, run, no_restore):
  code, _, err = run(sample, f"--workdir={tiny_workdir}", "--sampler=midpoint")
  one_line(code, err, "'midpoint' is a flow-matching sampler", "ddim")
  code, _, err = run(sample, f"--workdir={tiny_workdir}", "--sampler=ddim", "--karras")
  one_line(code, err, "karras sigmas are not supported by sampler 'ddim'")
  flow = tiny_config("configs/digits_flow.py")
  with pytest.raises(UserError, match="Karras sigmas are a setting of the diffusion samplers"):
    generate.sampler_settings(flow, karras=True)


# ---- Labels, condition rows, image size ----------------------------------------------------


def test_labels_outside_the_classes(tiny_workdir, loaded, run, no_restore):
  code, _, err = run(sample, f"--workdir={tiny_workdir}", "--labels=3,12")
  one_line(code, err, "--labels must be in [0, 10), got ['3', '12']")
  config, model, params = loaded
  key = jax.random.PRNGKey(0)
  for labels, bad in (([1, 12], "[12]"), ([-1, 10], "[-1, 10]")):
    with pytest.raises(
      UserError, match=re.escape(f"Labels {bad} are outside this model's classes [0, 10)")
    ):
      generate.generate(config, model, params, {"label": np.array(labels)}, key, 2, steps=2)
  # The bound itself: label 9 (num_classes - 1) samples.
  x = generate.generate(config, model, params, {"label": np.array([0, 9])}, key, 2, steps=2)
  assert x.shape == (2, 8, 8, 1)


def test_condition_rows_in_user_terms(loaded):
  """10 labels for 40 samples: the message counts samples, not the doubled CFG batch."""
  config, model, params = loaded
  cond = {"label": np.arange(10)}
  with pytest.raises(UserError, match="cond\\['label'\\] has 10 rows for 40 samples") as e:
    generate.generate(config, model, params, cond, jax.random.PRNGKey(0), 40, steps=2)
  assert "80" not in str(e.value)


def test_image_size_must_be_the_trained_one(tiny_workdir, run, no_restore):
  code, _, err = run(sample, f"--workdir={tiny_workdir}", "--config.model.input_size=16")
  one_line(code, err, "changes the model of", "model.input_size 8 -> 16")
  # The library too: the position embeddings are not params, so the shapes cannot tell.
  config = tiny_config(**{"model.input_size": 16})
  with pytest.raises(UserError, match=r"input_size=16 \(trained: 8\); this model makes 8x8"):
    generate.load_params(config, tiny_workdir)
  with pytest.raises(UserError, match="input_size=9 is not a multiple of patch_size=2"):
    generate.load_params(tiny_config(**{"model.input_size": 9}), tiny_workdir)


def test_editing_images_are_checked(tiny_workdir, tmp_path, run, no_restore):
  big, corrupt = tmp_path / "big.png", tmp_path / "corrupt.png"
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(big)
  corrupt.write_bytes(b"\x89PNG not really")
  cases = [
    ([f"--init_image={big}"], f"--init_image {str(big)!r} is 16x16 pixels; this model takes 8x8"),
    ([f"--init_image={corrupt}"], f"--init_image {str(corrupt)!r} is not a readable image"),
    ([f"--init_image={tmp_path}/none.png"], "none.png' does not exist"),
    ([f"--init_image={big}", "--mask=x.png"], "16x16 pixels"),
    ([f"--mask={big}"], "--strength and --mask need --init_image"),
  ]
  for args, message in cases:
    code, _, err = run(sample, f"--workdir={tiny_workdir}", *args)
    one_line(code, err, message)
  small = tmp_path / "small.png"
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(small)
  code, _, err = run(sample, f"--workdir={tiny_workdir}", f"--init_image={small}", f"--mask={big}")
  one_line(code, err, "--mask", "is 16x16 pixels; it must be 8x8")
  # strength keeps round(strength * steps) >= 1 steps: 0.2 of 5 is one step, 0.19 none.
  args = [f"--workdir={tiny_workdir}", f"--init_image={small}", "--steps=5"]
  code, _, err = run(sample, *args, "--strength=0.19")
  one_line(code, err, "strength=0.19 keeps no step out of steps=5")


def test_guidance_options_are_checked(tiny_workdir, run, no_restore):
  code, _, err = run(sample, f"--workdir={tiny_workdir}", "--guidance_rescale=1.5")
  one_line(code, err, "The guidance rescale must be in [0, 1], got 1.5")
  code, _, err = run(sample, f"--workdir={tiny_workdir}", "--guidance_interval=5,1")
  one_line(code, err, "guidance interval must satisfy 0 <= lo < hi")
  code, _, err = run(sample, f"--workdir={tiny_workdir}", "--guidance_interval=1")
  one_line(code, err, "--guidance_interval takes two numbers lo,hi, got 1")


# ---- The workdir contract --------------------------------------------------------------------


def test_workdir_alone_uses_its_config_json(tiny_workdir, tmp_path, run):
  code, out, err = run(info, f"--workdir={tiny_workdir}")
  assert code == 0, err
  assert json.loads(out)["params"] == info_params(tiny_config())
  code, _, err = run(evaluate, f"--workdir={tmp_path}")
  one_line(code, err, f"{tmp_path}/config.json' does not exist; pass --config")
  code, _, err = run(train, f"--workdir={tmp_path}/new")
  one_line(code, err, "config.json' does not exist; pass --config")


def info_params(config) -> int:
  from dit.models.flops import model_info

  return model_info(dit_model.build_model(config.model))["params"]


def test_config_keys(tiny_workdir, run):
  code, out, err = run(
    sample, f"--workdir={tiny_workdir}", "--config_keys", "--config.sample.eta=0.5"
  )
  assert code == 0, err
  lines = out.splitlines()
  assert lines[0].startswith("# config keys of") and "config.json" in lines[0]
  assert "sample.eta = 0.5" in lines and "model.hidden_size = 32" in lines
  assert "optim.lr = 0.002" in lines
  code, out, err = run(train, f"--config={DIGITS}", "--workdir=unused", "--config_keys")
  assert code == 0, err
  assert "model.depth = 4" in out.splitlines() and not os.path.exists("unused")


def test_config_of_another_model_is_refused(tiny_workdir, run, no_restore):
  code, _, err = run(
    evaluate, f"--config={DIGITS}", f"--workdir={tiny_workdir}", "--config.model.depth=1"
  )
  one_line(code, err, "changes the model of", "model.hidden_size 32 -> 128")
