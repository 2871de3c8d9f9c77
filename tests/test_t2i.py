"""Text-to-image end to end: captioned digits -> text embeddings -> adaLN-single DiT -> prompts.

Tiny configs and a few train steps check the plumbing and the bad-input errors; the quality
bar (>= 80% of prompted samples classified as the prompted digit) is the slow test.
"""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES
from PIL import Image

from dit import generate, metrics, train
from dit.cli import UserError, load_config
from dit.data import digits, make_train_iterator
from dit.data import text as text_lib
from dit.diffusion import schedules
from dit.models import convert
from dit.models import dit as dit_model

CONFIG = str(ROOT / "configs/t2i_pixart.py")
TINY = {
  **TINY_OVERRIDES,
  "data.resolution": 8,
  "model.input_size": 8,
  "text.demo_dim": 16,
  "text.demo_layers": 1,
  "text.demo_heads": 2,
  "sample.steps": 4,
}


def t2i_config(**overrides):
  """configs/t2i_pixart.py, tiny, with `overrides` ("a.b" keys as a__b)."""
  config = load_config(CONFIG)
  for key, value in {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny t2i run: (config, workdir)."""
  workdir = str(tmp_path_factory.mktemp("t2i"))
  config = t2i_config()
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_config_ties_text_sizes():
  config = load_config(CONFIG)
  assert config.data.text.max_length == config.data.max_text_length == config.model.caption_length
  assert config.model.caption_channels == config.text.demo_dim
  assert config.model.block == "adaln_single" and config.model.num_classes == 0
  config.text.max_length = 40  # Overrides follow the references.
  assert config.data.max_text_length == config.model.caption_length == 40
  assert config.data.text.max_length == 40


def test_digit_caption_templates():
  assert digits.digit_caption(7) == "a handwritten digit seven"
  assert digits.digit_caption(7, 1) == "the number 7"
  captions = digits.all_digit_captions()
  assert len(set(captions)) == 10 * len(digits.CAPTION_TEMPLATES)
  source = digits.DigitsSource(8, captions="templates")
  # Every digit is seen with every template (the draw does not follow the label).
  pairs = set(zip(source.labels.tolist(), source.templates.tolist(), strict=True))
  assert len(pairs) == 10 * len(digits.CAPTION_TEMPLATES)
  record = source[5]
  assert record["caption"] == digits.digit_caption(record["label"], source.templates[5])
  assert set(source.all_captions()) == set(captions)
  assert digits.DigitsSource(8, captions=True).all_captions() == digits.all_digit_captions(False)
  with pytest.raises(ValueError, match="captions must be one of"):
    digits.DigitsSource(8, captions="sometimes")


def test_pipeline_embeds_captions_with_the_config_encoder():
  config = t2i_config()
  it = make_train_iterator(config.data, global_batch_size=8, seed=0)
  batch = next(it)
  assert batch["text"].shape == (8, 32, 16) and batch["text"].dtype == np.float32
  assert batch["text_mask"].shape == (8, 32) and batch["text_mask"].dtype == np.int32
  assert it.loader.text_embedder is not None and len(it.loader.text_embedder) == 60
  encoder = text_lib.make_text_encoder(config.text)
  emb, mask = encoder.encode(list(batch["caption"]))
  np.testing.assert_allclose(batch["text"], np.asarray(emb), atol=1e-6)
  np.testing.assert_array_equal(batch["text_mask"], np.asarray(mask))
  for caption, label in zip(batch["caption"], batch["label"], strict=True):
    assert digits.DIGIT_NAMES[label] in caption or str(label) in caption
  # The same settings rebuild the same encoder (what dit.sample relies on).
  text_lib._make_text_encoder.cache_clear()
  again, _ = text_lib.make_text_encoder(config.text).encode(list(batch["caption"]))
  np.testing.assert_array_equal(np.asarray(again), np.asarray(emb))


def plain(config):
  """A copy without field references (as config.json gives), unlocked for edits."""
  return ml_collections.ConfigDict(json.loads(config.to_json()))


def test_pipeline_rejects_mismatched_text_length():
  config = plain(t2i_config())
  config.data.max_text_length = 16
  with pytest.raises(ValueError, match="max_text_length=16"):
    make_train_iterator(config.data, global_batch_size=8, seed=0)


def test_train_and_sample_prompts(trained, tmp_path):
  config, workdir = trained
  model, params = generate.load_params(config, workdir)
  assert params["y_embedding"].shape == (32, 16)  # The learned null caption.
  prompts = ["a handwritten digit seven", "the number 3"]
  cond = generate.text_cond(config, prompts)
  images = generate.generate(config, model, params, cond, jax.random.PRNGKey(0), 2)
  assert images.shape == (2, 8, 8, 1) and bool(jnp.all(jnp.abs(images) <= 1))
  # The grid written during training: one row per digit prompt.
  grid = generate.class_grid(
    config, model, params, schedules.from_config(config.diffusion), jax.random.PRNGKey(1), 20
  )
  assert grid.shape == (20, 8, 8, 1)


def test_empty_prompt_is_the_null_caption(trained):
  config, workdir = trained
  model, params = generate.load_params(config, workdir)
  cond = generate.text_cond(config, ["", "   ", "digit 4"])
  np.testing.assert_array_equal(cond["drop"], [True, True, False])
  # A dropped row sees the learned null caption (y_embedding) whatever its prompt.
  null = jnp.broadcast_to(params["y_embedding"], cond["text"].shape)
  explicit = {"text": null, "text_mask": cond["text_mask"]}
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 8, 8, 1))
  t = jnp.array([10.0, 500.0, 900.0])
  a = model.apply({"params": params}, x, t, cond)
  b = model.apply({"params": params}, x, t, explicit)
  np.testing.assert_allclose(a[:2], b[:2], atol=1e-6)


def test_long_prompts_warn_truncate_or_fail(trained):
  config, _ = trained
  long = "a handwritten digit seven, carefully drawn with a thick pen"
  with pytest.warns(UserWarning, match="more than max_length=32"):
    cond = generate.text_cond(config, [long])
  assert int(cond["text_mask"].sum()) == 32
  strict = t2i_config(text__overflow="error")
  with pytest.raises(UserError, match="more than max_length=32"):
    generate.text_cond(strict, [long])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    generate.text_cond(t2i_config(text__overflow="truncate"), [long])


def test_text_errors(trained):
  config, workdir = trained
  wide = plain(config)
  wide.model.caption_channels = 24
  with pytest.raises(UserError, match="caption_channels=24"):
    generate.text_cond(wide, ["seven"])
  with pytest.raises(UserError, match="no text conditioning"):
    generate.text_cond(load_config(str(ROOT / "configs/digits.py")), ["seven"])
  with pytest.raises(UserError, match="needs --prompt"):
    generate.sample_cond(t2i_config(sample__prompt_template=""), 4, None, None)
  with pytest.raises(UserError, match="does not fit config.model"):
    generate.load_params(t2i_config(model__depth=2), workdir)


def test_missing_model_files_are_listed(tmp_path):
  t5_dir, vae_dir = tmp_path / "t5", tmp_path / "vae"
  t5_dir.mkdir()
  vae_dir.mkdir()
  (t5_dir / "config.json").write_text("{}")
  config = t2i_config(text__t5_path=str(t5_dir), vae__path=str(vae_dir))
  with pytest.raises(UserError) as e:
    generate.text_cond(config, ["seven"])
  msg = str(e.value)
  for name in ("model.safetensors", "spiece.model or", "tokenizer.json", "vae/config.json"):
    assert name in msg
  assert "diffusion_pytorch_model.safetensors or" in msg and "t5/config.json" not in msg
  with pytest.raises(UserError, match="no such directory"):
    generate.check_model_dirs(t2i_config(vae__path=str(tmp_path / "nowhere")))


@pytest.mark.slow  # About 27 s; tests/test_flux.py samples a prompt through dit.sample.
def test_sample_command_with_prompts(trained, tmp_path):
  _, workdir = trained
  out = tmp_path / "seven.png"
  args = [f"--config={CONFIG}", f"--workdir={workdir}", "--num=4", f"--out={out}"]
  args += [f"--config.{k}={v}" for k, v in TINY.items()]
  result = _run("dit.sample", *args, "--prompt=a handwritten digit seven", "--prompt=")
  assert result.returncode == 0, result.stderr
  # The library's samples of the prompts [seven, seven, "", ""] (one row per prompt; the
  # empty one is the null caption), seed 0: a 2 x 2 grid of 8 x 8 digits, upscaled x20.
  config, _ = trained
  model, params = generate.load_params(config, workdir)
  prompts = ["a handwritten digit seven", ""]
  cond, per_row = generate.sample_cond(config, 4, prompts, None)
  np.testing.assert_array_equal(cond["drop"], [False, False, True, True])
  images = generate.generate(config, model, params, cond, jax.random.PRNGKey(0), 4)
  settings = generate.sampler_settings(config)
  caption = generate.grid_caption(config, settings)
  generate.save_grid(images, str(tmp_path / "want.png"), nrow=per_row, caption=caption)
  got, want = (np.asarray(Image.open(p)) for p in (out, tmp_path / "want.png"))
  assert got.shape == want.shape and per_row == 2
  assert np.abs(got.astype(int) - want).max() <= 1  # Another process: rounding at most.
  assert got.std() > 10
  # Without --config: the run's config.json.
  result = _run("dit.sample", f"--workdir={workdir}", "--num=2", f"--out={out}", "--prompt=two")
  assert result.returncode == 0, result.stderr
  bad = _run("dit.sample", *args, "--prompt=" + "x" * 40, "--config.text.overflow=error")
  assert bad.returncode == 2 and "more than max_length=32" in bad.stderr


def _run(module, *args):
  import subprocess
  import sys

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True
  )


@pytest.mark.slow  # T5 and VAE loading have default tests of their own (test_t5, test_vae).
def test_latent_pipeline_with_t5_and_vae_directories(tmp_path):
  """prompt -> T5 (local dir) -> DiT -> VAE decode (local dir) -> PNG, all tiny and random."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  diffusers = pytest.importorskip("diffusers")
  tokenizers = pytest.importorskip("tokenizers")

  torch.manual_seed(0)
  t5_dir, vae_dir = tmp_path / "t5", tmp_path / "vae"
  t5_cfg = transformers.T5Config(
    vocab_size=16, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0
  )
  transformers.T5EncoderModel(t5_cfg).eval().save_pretrained(str(t5_dir))
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "digit": 4, "seven": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(t5_dir / "tokenizer.json"))
  diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
  ).eval().save_pretrained(str(vae_dir))

  # A random latent DiT (8x8x4 latents, 16-d captions of 8 tokens) saved as a converted run.
  kwargs = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=1,
    num_heads=2,
    num_classes=0,
    learn_sigma=True,
    block="adaln_single",
    caption_channels=16,
    caption_length=8,
  )
  model = dit_model.DiT(**kwargs)
  params = model.init(jax.random.PRNGKey(0), *dit_model.example_inputs(model))["params"]
  base = load_config(CONFIG)
  config = convert.converted_config(base, kwargs, t5=str(t5_dir), vae=str(vae_dir))
  workdir = convert.write_checkpoint(params, config, str(tmp_path / "run"))
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["text"]["t5_path"] == str(t5_dir) and saved["vae"]["path"] == str(vae_dir)

  out = tmp_path / "latent.npz"
  result = _run(
    "dit.sample", f"--workdir={workdir}", "--num=2", "--steps=3", f"--out={out}",
    "--prompt=a digit seven",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  images = np.load(out)["images"]
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8  # 8x8 latents, VAE f=2.
  # A VAE directory that lost its weights: the error names the file.
  os.remove(vae_dir / "diffusion_pytorch_model.safetensors")
  result = _run("dit.sample", f"--workdir={workdir}", "--num=1", "--prompt=a digit")
  assert result.returncode == 2 and "diffusion_pytorch_model.safetensors" in result.stderr


@pytest.mark.slow
def test_prompted_digits_are_recognised(tmp_path):
  """The full configs/t2i_pixart.py run: >= 80% of 200 prompted samples show their digit."""
  config = load_config(CONFIG)
  config.progress_bar = False
  config.sample.num = 0
  workdir = str(tmp_path / "t2i")
  train.train_and_evaluate(config, workdir)
  model, params = generate.load_params(config, workdir)
  accuracy = prompt_accuracy(config, model, params, num=200)
  assert accuracy >= 0.8, accuracy


def prompt_accuracy(config, model, params, num=200, seed=0) -> float:
  """Digits-classifier accuracy of `num` samples prompted with every caption template."""
  labels = generate.grid_labels(num, 10)
  templates = np.arange(num) % len(digits.CAPTION_TEMPLATES)
  prompts = [digits.digit_caption(y, k) for y, k in zip(labels, templates, strict=True)]
  cond = generate.text_cond(config, prompts)
  images = generate.generate(config, model, params, cond, jax.random.PRNGKey(seed), num)
  return metrics.digits_classifier_accuracy(np.asarray(images), labels)
