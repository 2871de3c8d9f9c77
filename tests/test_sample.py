"""dit.sample on converted public checkpoints: official DiT layout -> convert command -> PNG."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from flax import traverse_util
from PIL import Image
from safetensors.numpy import save_file

from dit import checkpoint, generate
from dit.cli import UserError
from dit.models import convert
from dit.models.dit import DiT, example_inputs, sincos_pos_embed_2d

KWARGS = dict(
  input_size=8,
  patch_size=2,
  in_channels=4,
  hidden_size=32,
  depth=2,
  num_heads=2,
  num_classes=10,
  learn_sigma=True,
  block="adaln_zero",
)


def official_state_dict(params: dict, kwargs: dict) -> dict:
  """Flax params -> the official DiT release's state dict (the inverse of convert's rules)."""
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  p, c, d = kwargs["patch_size"], kwargs["in_channels"], kwargs["hidden_size"]
  sd = {}
  for path, (key,), kind in convert.dit_rules(kwargs["depth"], kwargs["num_classes"]):
    w = flat[path]
    if kind == "dense":
      w = w.T
    elif kind == "patch":
      w = w.reshape(p, p, c, d).transpose(3, 2, 0, 1)
    sd[key] = np.ascontiguousarray(w, np.float32)
  grid = kwargs["input_size"] // p
  sd["pos_embed"] = sincos_pos_embed_2d(d, grid, grid)[None]
  return sd


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """A tiny random DiT saved as an official-layout .safetensors: (path, params)."""
  model = DiT(**KWARGS)
  params = model.init(jax.random.PRNGKey(0), *example_inputs(model))["params"]
  # Non-zero everywhere (DiT zero-inits adaLN and the final layer), so every tensor matters.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
  params = jax.tree.unflatten(tree, leaves)
  path = str(tmp_path_factory.mktemp("official") / "DiT-tiny.safetensors")
  save_file(official_state_dict(params, KWARGS), path)
  return path, params


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True
  )


@pytest.mark.slow  # About 20 s; tests/test_convert.py checks the conversion itself.
def test_convert_command_then_sample(official, tmp_path):
  path, params = official
  workdir = tmp_path / "dit"
  # The head count is not in the weights; the default (width / 64) would be 1.
  result = _run(
    "dit.models.convert", "--kind=dit", f"--source={path}", f"--workdir={workdir}", "--num_heads=2"
  )
  assert result.returncode == 0, result.stderr
  config = json.loads((workdir / "config.json").read_text())
  assert {k: config["model"][k] for k in KWARGS} == KWARGS
  assert config["vae"]["path"] == ""
  # The checkpoint restores to the original params, through the config.json fallback.
  restored_config = checkpoint.read_config(str(workdir))
  model, restored = generate.load_params(restored_config, str(workdir))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, restored)

  out = tmp_path / "grid.png"
  result = _run(
    "dit.sample", f"--workdir={workdir}", "--num=4", "--steps=3", f"--out={out}", "--labels=1,7"
  )
  assert result.returncode == 0, result.stderr
  # The grid is the library's samples of labels 1, 7, 1, 7 (seed 0, 3 steps, EMA params):
  # 2 x 2 images of 8 x 8 latents' first 3 channels, upscaled x20 (320 // (2 * 8)).
  cond, per_row = generate.sample_cond(restored_config, 4, None, ["1", "7"])
  np.testing.assert_array_equal(cond["label"], [1, 7, 1, 7])
  key = jax.random.PRNGKey(0)
  images = generate.generate(restored_config, model, restored, cond, key, 4, steps=3)
  settings = generate.sampler_settings(restored_config, steps=3)
  caption = generate.grid_caption(restored_config, settings)
  assert caption == "ddim, 3 steps, guidance 1.5"
  want_path = str(tmp_path / "want.png")
  generate.save_grid(generate.decode(restored_config, images), want_path, per_row, caption=caption)
  got, want = (np.asarray(Image.open(p)) for p in (out, want_path))
  assert got.shape == want.shape and per_row == 2
  # Another process, the same programs: equal up to a rounding step of the uint8 conversion.
  assert np.abs(got.astype(int) - want).max() <= 1
  assert got.std() > 10  # Not a blank grid.

  # A second conversion into the same workdir is refused.
  again = _run("dit.models.convert", "--kind=dit", f"--source={path}", f"--workdir={workdir}")
  assert again.returncode == 2 and "already holds checkpoints" in again.stderr


def test_convert_command_errors(tmp_path):
  missing = _run(
    "dit.models.convert", "--kind=dit", f"--source={tmp_path}/nope.pt", f"--workdir={tmp_path}/w"
  )
  assert missing.returncode == 2 and "No checkpoint file" in missing.stderr
  no_source = _run("dit.models.convert", "--kind=pixart", f"--workdir={tmp_path}/w")
  assert no_source.returncode == 2 and "--source" in no_source.stderr


def test_load_workdir_config_and_errors(tmp_path, tiny):
  with pytest.raises(UserError, match="config.json"):
    checkpoint.read_config(str(tmp_path))
  config = tiny()
  (tmp_path / "config.json").write_text(config.to_json())
  loaded = checkpoint.read_config(str(tmp_path))
  assert loaded.model.hidden_size == config.model.hidden_size and loaded.is_locked
  with pytest.raises(UserError, match="No checkpoints"):
    generate.load_params(loaded, str(tmp_path))


def test_sample_cond_labels_and_prompts():
  config = tiny_config()
  cond, per_row = generate.sample_cond(config, 20, None, None)
  np.testing.assert_array_equal(cond["label"], generate.grid_labels(20, 10))
  cond, _ = generate.sample_cond(config, 4, None, ["3", "5"])
  np.testing.assert_array_equal(cond["label"], [3, 5, 3, 5])
  with pytest.raises(UserError, match="--labels must be in"):
    generate.sample_cond(config, 4, None, ["10"])
  with pytest.raises(UserError, match="--prompt needs a text-to-image model"):
    generate.sample_cond(config, 4, ["a seven"], None)


# ---- Editing and guidance from the command line (in this process) -------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A tiny random digits model (step 0 of a workdir) and an 8x8 test image and mask. It
  predicts v: an untrained eps model's samples saturate at +-1 (x_T / alpha_T)."""
  from test_early_checks import write_tiny_workdir

  root = tmp_path_factory.mktemp("edit")
  workdir = write_tiny_workdir(root / "run", **{"diffusion.prediction": "v"})
  image = np.zeros((8, 8), np.uint8)
  image[1:7, 3:5] = 255  # A "1".
  Image.fromarray(image).save(root / "one.png")
  keep = np.zeros((8, 8), np.uint8)
  keep[:, :4] = 255  # White = keep: the left half.
  Image.fromarray(keep).save(root / "left.png")
  Image.fromarray(np.full((8, 8), 255, np.uint8)).save(root / "all.png")
  return root, workdir, image


def sample_here(monkeypatch, capsys, *args):
  from test_early_checks import run_command_here

  from dit import sample

  code, _, err = run_command_here(sample, *args, monkeypatch=monkeypatch, capsys=capsys)
  assert code == 0, err


def library_samples(workdir, num, labels, uint8=True, **options):
  """The samples of the library call that the command should make (seed 0)."""
  config, model, params = generate.load(str(workdir))
  cond, _ = generate.sample_cond(config, num, None, labels)
  x = generate.generate(config, model, params, cond, jax.random.PRNGKey(0), num, **options)
  return generate.to_uint8(generate.decode(config, x)) if uint8 else np.asarray(x)


def test_img2img_command(tiny_run, monkeypatch, capsys):
  root, workdir, image = tiny_run
  out = root / "i2i.npz"
  common = [f"--workdir={workdir}", "--num=4", "--labels=1,7", "--steps=5", f"--out={out}"]
  sample_here(monkeypatch, capsys, *common, f"--init_image={root}/one.png", "--strength=0.6")
  got = np.load(out)["images"]
  x_init = image[None, :, :, None] / 127.5 - 1.0
  want = library_samples(workdir, 4, ["1", "7"], steps=5, x_init=x_init, strength=0.6)
  np.testing.assert_array_equal(got, want)
  plain = library_samples(workdir, 4, ["1", "7"], steps=5)
  assert np.abs(got.astype(int) - plain).mean() > 5  # It started from the image, not noise.
  # The boundary: strength 1 / steps keeps exactly one step and runs.
  sample_here(monkeypatch, capsys, *common, f"--init_image={root}/one.png", "--strength=0.2")
  # Invariance: a mask that keeps everything returns the image itself, at any strength.
  sample_here(
    monkeypatch, capsys, *common, f"--init_image={root}/one.png", f"--mask={root}/all.png",
    "--strength=0.6",
  )  # fmt: skip
  np.testing.assert_array_equal(np.load(out)["images"][..., 0], np.broadcast_to(image, (4, 8, 8)))


def test_inpainting_command(tiny_run, monkeypatch, capsys):
  root, workdir, image = tiny_run
  out = root / "inpainted.npz"
  args = [f"--workdir={workdir}", "--num=4", "--steps=5", f"--out={out}", "--sampler=dpmpp_2m"]
  sample_here(monkeypatch, capsys, *args, f"--init_image={root}/one.png", f"--mask={root}/left.png")
  got = np.load(out)["images"][..., 0]
  # White = keep: the left half is the image, exactly; the right half is generated.
  np.testing.assert_array_equal(got[:, :, :4], np.broadcast_to(image[:, :4], (4, 8, 4)))
  assert np.abs(got[:, :, 4:].astype(int) - image[:, 4:]).mean() > 5
  mask = np.zeros((1, 8, 8, 1), np.float32)
  mask[:, :, :4] = 1.0
  x_init = image[None, :, :, None] / 127.5 - 1.0
  config = checkpoint.read_config(str(workdir))
  labels = generate.grid_labels(4, 10).tolist()
  want = library_samples(workdir, 4, labels, sampler="dpmpp_2m", steps=5, x_init=x_init, mask=mask)
  np.testing.assert_array_equal(got, want[..., 0])
  assert config.model.num_classes == 10


def test_guidance_options_command(tiny_run, monkeypatch, capsys):
  """--karras, --guidance_rescale and --guidance_interval reach generate() as given."""
  root, workdir, _ = tiny_run
  out = root / "guided.npz"
  args = [f"--workdir={workdir}", "--num=2", "--steps=4", f"--out={out}", "--sampler=dpmpp_2m"]
  extra = ["--karras", "--guidance_rescale=0.7", "--guidance_interval=0.5,3"]
  sample_here(monkeypatch, capsys, *args, *extra)
  options = dict(sampler="dpmpp_2m", steps=4, karras=True, guidance_rescale=0.7)
  labels = generate.grid_labels(2, 10).tolist()
  want = library_samples(workdir, 2, labels, guidance_interval=(0.5, 3.0), **options)
  np.testing.assert_array_equal(np.load(out)["images"], want)
  with_interval = library_samples(workdir, 2, labels, False, guidance_interval=(0.5, 3), **options)
  without = library_samples(workdir, 2, labels, False, **options)
  # The interval switches guidance off at some steps (a random model's labels matter little).
  assert np.abs(with_interval - without).max() > 1e-5


def test_flow_model_takes_every_option(tmp_path):
  """A flow-matching model: inpainting keeps the masked region, and a guidance interval that
  contains no step's noise level turns guidance off (the conditional output, as scale 1)."""
  from test_early_checks import write_tiny_workdir

  workdir = write_tiny_workdir(tmp_path / "flow", config_file="configs/digits_flow.py")
  config, model, params = generate.load(workdir)
  cond = {"label": np.array([2, 5])}
  key = jax.random.PRNGKey(0)
  x_init = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 8, 8, 1)
  mask = np.zeros((1, 8, 8, 1), np.float32)
  mask[:, :4] = 1.0  # Keep the top half.
  x = generate.generate(config, model, params, cond, key, 2, steps=4, x_init=x_init, mask=mask)
  np.testing.assert_allclose(np.asarray(x)[:, :4], x_init[:, :4], atol=1e-6)
  assert np.abs(np.asarray(x)[:, 4:] - x_init[:, 4:]).mean() > 0.05
  off = generate.generate(config, model, params, cond, key, 2, steps=4, guidance_interval=(0, 1e-9))
  unguided = generate.generate(config, model, params, cond, key, 2, steps=4, cfg_scale=1.0)
  guided = generate.generate(config, model, params, cond, key, 2, steps=4)
  np.testing.assert_allclose(off, unguided, atol=1e-5)
  assert np.abs(np.asarray(guided) - np.asarray(off)).max() > 1e-3


def test_grid_cells_are_padded_and_rows_labelled():
  # 5 images of 4 x 4, 2 per row: 3 rows, the last one half empty; cells upscaled x3.
  images = np.linspace(-1, 1, 5 * 4 * 4).reshape(5, 4, 4, 1)
  plain = np.asarray(generate.grid_image(images, nrow=2, upscale=3))
  pad = 2  # max(2, 12 // 16)
  assert plain.shape == (pad + 3 * (12 + pad), pad + 2 * (12 + pad), 3)
  cells = generate.to_uint8(images).repeat(3, axis=1).repeat(3, axis=2)
  for i in range(5):
    r, c = divmod(i, 2)
    y, x = pad + r * (12 + pad), pad + c * (12 + pad)
    np.testing.assert_array_equal(plain[y : y + 12, x : x + 12, 0], cells[i, ..., 0])
  # Between the cells, and where the sixth image would be: the grey background.
  assert (plain[:pad] == generate.GRID_BACKGROUND).all()
  assert (plain[:, 14:16] == generate.GRID_BACKGROUND).all()
  assert (plain[30:42, 16:28] == generate.GRID_BACKGROUND).all()
  labelled = np.asarray(
    generate.grid_image(images, nrow=2, upscale=3, row_labels=["0", "1", "2"], caption="ddim")
  )
  assert labelled.shape[1] > plain.shape[1] and labelled.shape[0] > plain.shape[0]
  left = labelled.shape[1] - plain.shape[1]
  assert (labelled[:, :left] > 200).any()  # Label text (antialiased) left of the rows ...
  assert (labelled[-12:] > 200).any()  # ... and the caption below them.
