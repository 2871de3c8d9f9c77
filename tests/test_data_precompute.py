"""Precompute (VAE latents of both flips + text embeddings) and the precomputed source."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from dit.data import make_train_iterator, precomputed
from dit.data import precompute as precompute_lib
from dit.data.digits import DigitsSource
from dit.data.precompute import load_encoders, precompute
from dit.data.precomputed import PrecomputedSource


class Subset:
  def __init__(self, source, n):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i]


def encode_images(images, key):
  """A stand-in VAE: 4x4 mean pooling (3 channels) + a key-dependent "posterior noise" channel."""
  b, h, w, c = images.shape
  pooled = images.reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4))
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  noise = rng.normal(size=(b, h // 4, w // 4, 1)) * 1e-3
  return np.concatenate([pooled, noise], axis=-1)


def encode_text(captions):
  """A stand-in T5: L=6 tokens (one per word, padded), D=3 features."""
  emb = np.zeros((len(captions), 6, 3), np.float32)
  mask = np.zeros((len(captions), 6), np.int32)
  for i, caption in enumerate(captions):
    words = caption.split()[:6]
    mask[i, : len(words)] = 1
    emb[i, : len(words), 0] = [len(w) for w in words]
  return emb, mask


def run(out, n=50, **kw):
  source = Subset(DigitsSource(16, captions=True), n)
  kw = dict(resolution=16, channels=3, batch_size=8, shard_size=16, **kw)
  return precompute(source, str(out), encode_images=encode_images, encode_text=encode_text, **kw)


def test_precompute_writes_both_flips_labels_and_text(tmp_path):
  meta = run(tmp_path)
  assert meta["num_records"] == 50 and meta["num_shards"] == 4
  assert meta["shapes"] == {"latent": [2, 4, 4, 4], "label": [], "text": [6, 3], "text_mask": [6]}
  src = PrecomputedSource(str(tmp_path))
  digits = DigitsSource(16, captions=True)
  for i in (0, 17, 49):
    rec = src[i]
    image = np.repeat(digits[i]["image"], 3, axis=-1)[None]
    want = encode_images(np.concatenate([image, image[:, :, ::-1]]), jax.random.key(0))
    np.testing.assert_allclose(rec["latent"][0, ..., :3], want[0, ..., :3], atol=1e-6)
    np.testing.assert_allclose(rec["latent"][1, ..., :3], want[1, ..., :3], atol=1e-6)
    assert rec["label"] == digits[i]["label"]
    emb, mask = encode_text([digits[i]["caption"]])
    np.testing.assert_array_equal(rec["text"], emb[0])
    np.testing.assert_array_equal(rec["text_mask"], mask[0])


def test_precompute_independent_of_process_count_and_resumes(tmp_path):
  run(tmp_path / "one")
  for p in (1, 0):  # Two "processes", in any order, into one directory.
    run(tmp_path / "two", process_index=p, process_count=2)
  names = sorted(os.listdir(tmp_path / "one"))
  assert names == sorted(os.listdir(tmp_path / "two"))
  for name in names:
    if name.endswith(".npy"):
      np.testing.assert_array_equal(
        np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)
      )
  # A killed run: a shard is missing; re-running writes only that one, identically.
  shard = tmp_path / "one" / "latent-00002-of-00004.npy"
  want = np.load(shard)
  os.remove(shard)
  os.remove(tmp_path / "one" / "label-00002-of-00004.npy")
  mtime = os.path.getmtime(tmp_path / "one" / "latent-00001-of-00004.npy")
  run(tmp_path / "one")
  np.testing.assert_array_equal(np.load(shard), want)
  assert os.path.getmtime(tmp_path / "one" / "latent-00001-of-00004.npy") == mtime


def test_train_iterator_on_precomputed_latents(tmp_path):
  run(tmp_path, dtype="float16")
  cfg = {"name": "precomputed", "path": str(tmp_path)}
  src = PrecomputedSource(str(tmp_path))
  it = make_train_iterator(cfg, global_batch_size=10, seed=0)
  flips = set()
  for _ in range(5):  # One epoch.
    batch = next(it)
    assert batch["latent"].shape == (10, 4, 4, 4) and batch["latent"].dtype == np.float32
    assert batch["text"].shape == (10, 6, 3) and batch["text"].dtype == np.float32
    assert batch["text_mask"].dtype == np.int32 and batch["label"].dtype == np.int32
    for latent, label, mask in zip(
      batch["latent"], batch["label"], batch["text_mask"], strict=True
    ):
      # Find the record: each row is one of its two stored flips.
      hits = [
        (i, f)
        for i in range(len(src))
        for f in (0, 1)
        if np.array_equal(src[i]["latent"][f], latent)
      ]
      assert hits and src[hits[0][0]]["label"] == label
      assert mask.sum() == 4  # "a handwritten digit <name>".
      flips.add(hits[0][1])
  assert flips == {0, 1}
  two = [
    make_train_iterator(cfg, global_batch_size=10, seed=0, process_index=p, process_count=2)
    for p in (0, 1)
  ]
  full = make_train_iterator(cfg, global_batch_size=10, seed=0)
  want, got = next(full), [next(t) for t in two]
  np.testing.assert_array_equal(np.concatenate([g["latent"] for g in got]), want["latent"])


def test_precomputed_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m dit.data.precompute"):
    PrecomputedSource(str(tmp_path))
  run(tmp_path / "p", process_index=0, process_count=2)  # Half the shards only.
  with pytest.raises(FileNotFoundError, match="lacks 2 of 4 latent shards"):
    PrecomputedSource(str(tmp_path / "p"))
  with pytest.raises(ValueError, match="dtype"):
    run(tmp_path / "q", dtype="int8")


def test_format_names_are_one_and_still_importable_from_precompute():
  # The reader module owns the format; the writer (and benchmarks/data.py) use the same names.
  assert precompute_lib.META is precomputed.META == "meta.json"
  assert precompute_lib.shard_name is precomputed.shard_name
  assert precompute_lib.PrecomputedSource is PrecomputedSource
  assert precomputed.shard_name("latent", 3, 12) == "latent-00003-of-00012.npy"


def test_identity_vae_and_demo_t5_encoders(tmp_path):
  encode_images, encode_text = load_encoders("identity", "demo", text_len=32)
  source = Subset(DigitsSource(16, captions=True), 6)
  precompute(
    source,
    str(tmp_path),
    encode_images=encode_images,
    encode_text=encode_text,
    resolution=16,
    channels=1,
    batch_size=4,
    shard_size=8,
  )
  src = PrecomputedSource(str(tmp_path))
  rec = src[5]
  np.testing.assert_array_equal(rec["latent"][0], source[5]["image"])
  np.testing.assert_array_equal(rec["latent"][1], source[5]["image"][:, ::-1])
  assert rec["text"].shape == (32, 64) and rec["text_mask"].shape == (32,)
  emb, mask = encode_text([source[5]["caption"]])
  # Encoded in a batch of 4 there and of 1 here: XLA's float rounding may differ by an ulp.
  np.testing.assert_allclose(rec["text"], emb[0], atol=1e-5)
  np.testing.assert_array_equal(rec["text_mask"], mask[0])
  assert 0 < mask.sum() < 32  # Byte tokens of "a handwritten digit five" + EOS.


def test_real_vae_encoder_matches_diffusers_posterior(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.5,
  ).eval()
  vae.save_pretrained(tmp_path / "vae")
  encode_images, _ = load_encoders(str(tmp_path / "vae"))
  source = Subset(DigitsSource(16), 3)
  precompute(
    source, str(tmp_path / "out"), encode_images=encode_images, resolution=16, batch_size=3
  )
  latents = PrecomputedSource(str(tmp_path / "out")).read_batch(np.arange(3), np.zeros(3))["latent"]
  images = np.repeat(np.stack([source[i]["image"] for i in range(3)]), 3, axis=-1)
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
  mean = dist.mean.permute(0, 2, 3, 1).numpy() * 0.5
  std = dist.std.permute(0, 2, 3, 1).numpy() * 0.5
  assert latents.shape == mean.shape == (3, 8, 8, 4)
  # A posterior sample with the scale applied: z = (mean + std * noise) * scale, the noise
  # drawn from the batch's key fold_in(key(seed 0), first record 0) for [images; flipped].
  noise = (latents - mean) / std
  want = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), (6, 8, 8, 4)))
  np.testing.assert_allclose(noise, want[:3], atol=1e-4)  # Measured: 1e-6 (std 0.37..0.69).


def test_precompute_command_line(tmp_path):
  config = tmp_path / "cfg.py"
  config.write_text(
    "import ml_collections\n"
    "def get_config():\n"
    "  c = ml_collections.ConfigDict()\n"
    "  c.data = ml_collections.ConfigDict(dict(name='digits', resolution=8, captions=True))\n"
    "  return c\n"
  )
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "dit.data.precompute", f"--config={config}", f"--out={out}"]
  cmd += ["--vae=identity", "--t5=demo", "--text_len=32", "--shard_size=1000", "--batch_size=512"]
  subprocess.run(cmd, check=True, capture_output=True, timeout=300)
  src = PrecomputedSource(str(out))
  assert len(src) == 1797 and src.fields == ["latent", "label", "text", "text_mask"]
  # The identity "VAE" stores the 8x8 digits themselves (grey repeated to 3 channels) and
  # their mirror images; the demo T5 the embeddings of each record's caption.
  digits = DigitsSource(8, captions=True)
  _, encode_text = load_encoders("identity", "demo", text_len=32)
  records = [0, 901, 1796]
  emb, mask = encode_text([digits[i]["caption"] for i in records])
  for j, i in enumerate(records):
    rec, image = src[i], np.repeat(digits[i]["image"], 3, axis=-1)
    np.testing.assert_array_equal(rec["latent"][0], image)
    np.testing.assert_array_equal(rec["latent"][1], image[:, ::-1])
    assert rec["label"] == digits[i]["label"]
    np.testing.assert_allclose(rec["text"], emb[j], atol=1e-5)  # Batches of 512 and of 3.
    np.testing.assert_array_equal(rec["text_mask"], mask[j])
  # And the training pipeline reads them back: batch rows are stored records (either flip).
  batch = next(
    make_train_iterator({"name": "precomputed", "path": str(out)}, global_batch_size=8, seed=0)
  )
  assert batch["latent"].shape == (8, 8, 8, 3) and batch["text"].shape == (8, 32, 64)
  stored = src.read_batch(np.arange(len(src)), np.zeros(len(src), bool))["latent"]
  flipped = stored[:, :, ::-1]
  for latent, label in zip(batch["latent"], batch["label"], strict=True):
    hits = np.flatnonzero((stored == latent).all(axis=(1, 2, 3)))
    hits = hits if len(hits) else np.flatnonzero((flipped == latent).all(axis=(1, 2, 3)))
    assert len(hits) and digits.labels[hits[0]] == label


# ----------------------------------------------------------------------------- REPA features


def tiny_dinov2(path, seed=0, **kw):
  """A random 2-layer DINOv2 (D = 32, patch 2) saved as a Hugging Face directory."""
  from dit.models import dinov2

  sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8)
  cfg = dinov2.Dinov2Config(**{**sizes, "patch_size": 2, **kw})
  dinov2.save_hf(str(path), cfg, dinov2.init_params(cfg, seed))
  return str(path)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  """Two tiny RGB DINOv2 directories (other seeds; the grey digits are repeated to RGB) and a
  grey one (num_channels=1)."""
  root = tmp_path_factory.mktemp("dinov2")
  rgb = tiny_dinov2(root / "a", seed=0), tiny_dinov2(root / "b", seed=1)
  return (*rgb, tiny_dinov2(root / "grey", seed=2, num_channels=1))


def direct_features(path, images, resolution=None):
  """The reference: dinov2.make_features on the images, no precompute code involved."""
  from dit.models import dinov2

  cfg, params = dinov2.load_dinov2(path)
  feats = dinov2.make_features(cfg, resolution=resolution, value_range=(-1.0, 1.0), antialias=False)
  return np.asarray(jax.jit(feats)(params, np.asarray(images, np.float32))["patch"])


def run_repa(out, encoder, n=20, resolution=0, **kw):
  """n grey 8x8 digits, pixels as latents, shards of 8 (the last one short), batches of 4."""
  encode_images, _ = load_encoders("identity")
  repa = None if encoder is None else precompute_lib.load_repa_encoder(encoder, resolution)
  kw = {**dict(resolution=8, channels=1, batch_size=4, shard_size=8), **kw}
  return precompute(
    Subset(DigitsSource(8), n), str(out), encode_images=encode_images, encode_repa=repa, **kw
  )


@pytest.mark.parametrize("which, resolution, tokens", [(0, 0, 16), (0, 4, 4), (2, 0, 16)])
def test_repa_features_of_both_flips(tmp_path, encoders, which, resolution, tokens):
  encoder = encoders[which]  # RGB (grey digits repeated) or grey.
  meta = run_repa(tmp_path, encoder, resolution=resolution)
  want_meta = {
    "encoder": os.path.abspath(encoder),
    "resolution": resolution or 8,
    "tokens": tokens,
    "dim": 32,
  }
  assert meta["repa"] == want_meta and meta["shapes"]["repa"] == [2, tokens, 32]
  src = PrecomputedSource(str(tmp_path))
  assert src.meta["repa"] == want_meta and src.fields[-1] == "repa"
  digits = DigitsSource(8)
  images = np.stack([digits[i]["image"] for i in range(20)])  # (20, 8, 8, 1)
  direct = lambda x: direct_features(encoder, x, resolution or None)
  unflipped, flipped = direct(images), direct(images[:, :, ::-1])
  assert unflipped.shape == (20, tokens, 32)
  assert np.abs(unflipped - flipped).max() > 0.1  # The flip changes the features.
  for i in (0, 5, 8, 19):  # Across shards and batches (batches of 4 in shards of 8).
    rec = src[i]
    assert rec["repa"].dtype == np.float32
    # Batches of 8 there and of 20 here: XLA's float rounding may differ by an ulp.
    np.testing.assert_allclose(rec["repa"][0], unflipped[i], atol=1e-5)
    np.testing.assert_allclose(rec["repa"][1], flipped[i], atol=1e-5)
  # read_batch: each row's features of its own flip, as its latent.
  indices, flips = np.array([3, 19, 8, 3]), np.array([True, False, True, False])
  batch = src.read_batch(indices, flips)
  assert batch["repa"].shape == (4, tokens, 32)
  for row, (i, f) in enumerate(zip(indices, flips, strict=True)):
    np.testing.assert_array_equal(batch["repa"][row], src[i]["repa"][int(f)])
    np.testing.assert_array_equal(batch["latent"][row], src[i]["latent"][int(f)])


def test_repa_features_through_the_train_iterator(tmp_path, encoders):
  run_repa(tmp_path, encoders[0], dtype="float16")
  src = PrecomputedSource(str(tmp_path))
  assert src[0]["repa"].dtype == np.float16  # Stored in --dtype, like the latents.
  cfg = {"name": "precomputed", "path": str(tmp_path)}
  batch = next(make_train_iterator(cfg, global_batch_size=20, seed=0))
  assert batch["repa"].shape == (20, 16, 32)
  flips = set()
  for latent, repa in zip(batch["latent"], batch["repa"], strict=True):
    hits = [
      (i, f) for i in range(20) for f in (0, 1) if np.array_equal(src[i]["latent"][f], latent)
    ]
    assert len(hits) == 1  # No digit here is its own mirror image.
    ((i, f),) = hits
    np.testing.assert_array_equal(repa, src[i]["repa"][f])
    flips.add(f)
  assert flips == {0, 1}


def test_repa_bad_inputs_fail_before_anything_is_written(tmp_path, encoders):
  load = precompute_lib.load_repa_encoder
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"missing \['config.json', 'model.safetensors"):
    load(str(tmp_path / "empty"))
  with pytest.raises(
    ValueError, match="resolution 5 is not a positive multiple of its patch size 2"
  ):
    load(encoders[0], 5)
  with pytest.raises(ValueError, match="must be >= 0 .* got -2"):
    load(encoders[0], -2)
  # Patch 3 does not divide the data's 8 pixels (without --repa_resolution), nor does a
  # 1-channel encoder take RGB data: refused before the output directory is even created.
  patch3 = tiny_dinov2(tmp_path / "patch3", patch_size=3, image_size=9)
  with pytest.raises(ValueError, match="patch size 3, which does not divide the data resolution 8"):
    run_repa(tmp_path / "out", patch3)
  with pytest.raises(ValueError, match="takes 1-channel images, the data has 3 channels"):
    run_repa(tmp_path / "out", encoders[2], channels=3)
  assert not (tmp_path / "out").exists()
  # What it accepts: RGB data and grey data (repeated) with an RGB encoder, patch 3 at 6 px.
  assert load(encoders[0]).record(8, 3)["tokens"] == 16
  assert load(patch3, 6).record(8, 1) == {
    "encoder": patch3,
    "resolution": 6,
    "tokens": 4,
    "dim": 32,
  }


def test_repa_resume_and_mismatches(tmp_path, encoders):
  a, b, _ = encoders
  out = tmp_path / "out"
  meta = run_repa(out, a)
  # A killed run: shard 1 is missing; re-running writes only that one, identically.
  shard = out / "repa-00001-of-00003.npy"
  want = np.load(shard)
  os.remove(shard)
  os.remove(out / "label-00001-of-00003.npy")
  mtime = os.path.getmtime(out / "repa-00000-of-00003.npy")
  assert run_repa(out, a) == meta
  np.testing.assert_array_equal(np.load(shard), want)
  assert os.path.getmtime(out / "repa-00000-of-00003.npy") == mtime
  # Other features than meta.json records: an error naming both, and nothing is written.
  os.remove(out / "label-00001-of-00003.npy")
  with pytest.raises(ValueError, match=f"{re.escape(a)}.*meta.json.*{re.escape(b)}"):
    run_repa(out, b)
  with pytest.raises(ValueError, match="'resolution': 8.*'resolution': 4"):
    run_repa(out, a, resolution=4)
  with pytest.raises(ValueError, match="holds REPA features {.*}.*asks for None"):
    run_repa(out, None)
  assert not (out / "label-00001-of-00003.npy").exists()
  # Before a first run finished there is no meta.json: the finished shards' features decide.
  os.remove(out / "meta.json")
  with pytest.raises(ValueError, match=r"shape \(tokens, dim\) \[16, 32\].*asks for \[4, 32\]"):
    run_repa(out, a, resolution=4)
  with pytest.raises(ValueError, match=r"\[16, 32\].*asks for None"):
    run_repa(out, None)
  run(tmp_path / "plain", n=20)  # Shards without REPA features.
  os.remove(tmp_path / "plain" / "meta.json")
  with pytest.raises(ValueError, match=r"features of shape \(tokens, dim\) None.*\[16, 32\]"):
    precompute(
      Subset(DigitsSource(16, captions=True), 20),
      str(tmp_path / "plain"),
      encode_images=encode_images,
      encode_repa=precompute_lib.load_repa_encoder(a, 8),
      resolution=16,
      shard_size=16,
    )
  assert not (out / "label-00001-of-00003.npy").exists()
  assert run_repa(out, a) == meta  # The same encoder resumes.


@pytest.mark.slow  # Three subprocesses (about 11 s).
def test_repa_command_line(tmp_path, encoders):
  config = tmp_path / "cfg.py"
  config.write_text(
    "import ml_collections\n"
    "def get_config():\n"
    "  c = ml_collections.ConfigDict()\n"
    "  c.data = ml_collections.ConfigDict(dict(name='digits', resolution=8, channels=1))\n"
    "  return c\n"
  )
  cmd = [sys.executable, "-m", "dit.data.precompute", f"--config={config}", "--vae=identity"]
  cmd += ["--shard_size=1000", "--batch_size=512", "--progress=false"]
  bad = subprocess.run(
    [*cmd, f"--out={tmp_path / 'bad'}", f"--repa_encoder={tmp_path / 'nowhere'}"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 2 and not (tmp_path / "bad").exists()
  assert (
    bad.stderr.strip()
    .splitlines()[-1]
    .startswith(f"error: --repa_encoder={tmp_path / 'nowhere'}: DINOv2 model directory")
  )
  out = tmp_path / "out"
  cmd += [f"--out={out}", f"--repa_encoder={encoders[0]}", "--repa_resolution=4"]
  subprocess.run(cmd, check=True, capture_output=True, timeout=300)
  src = PrecomputedSource(str(out))
  assert src.meta["repa"] == {
    "encoder": os.path.abspath(encoders[0]),
    "resolution": 4,
    "tokens": 4,
    "dim": 32,
  }
  image = DigitsSource(8)[1500]["image"]
  want = direct_features(encoders[0], np.stack([image, image[:, ::-1]]), 4)
  np.testing.assert_allclose(src[1500]["repa"], want, atol=1e-5)
  # Resuming with another resolution: one line naming both, exit code 2.
  other = subprocess.run([*cmd, "--repa_resolution=8"], capture_output=True, text=True, timeout=300)
  assert other.returncode == 2
  assert re.match(
    r"error: .* holds REPA features .*'resolution': 4.* asks for .*'resolution': 8",
    other.stderr.strip().splitlines()[-1],
  )
