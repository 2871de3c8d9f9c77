"""Multi-aspect training: bucket tables, nearest-bucket assignment, bucketed batches (one shape
per global batch, deterministic, independent of the process count, exact on resume), a train
run that compiles once per bucket and resumes exactly, and sampling at other sizes."""

import ast
import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from dit import generate, train
from dit.cli import UserError
from dit.data import buckets, pipeline, preprocess

# (height, width) of the test images: square, wide, tall and in between.
SHAPES = [(16, 16), (12, 40), (40, 12), (15, 25), (26, 14)]


def make_folder(root, per_shape=8, shapes=SHAPES, classes=2, mode="RGB"):
  """per_shape random images of each shape, spread over `classes` class folders."""
  rng = np.random.default_rng(0)
  channels = 3 if mode == "RGB" else 1
  i = 0
  for h, w in shapes:
    for _ in range(per_shape):
      folder = os.path.join(root, f"c{i % classes}")
      os.makedirs(folder, exist_ok=True)
      pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
      Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(f"{folder}/{i:03d}.png")
      i += 1
  return str(root)


def data_config(path, **extra):
  return {**dict(name="folder", path=path, resolution=16, buckets=True, num_threads=2), **extra}


def take(it, n):
  return [next(it) for _ in range(n)]


# ---- The table and the assignment -----------------------------------------------------------


@pytest.mark.parametrize("base,divisor", [(1024, 64), (256, 16), (256, 32), (16, 2), (48, 4)])
def test_bucket_table_properties(base, divisor):
  table = buckets.bucket_table(base, divisor)
  h, w = table[:, 0], table[:, 1]
  assert np.all(table % divisor == 0)
  area = h * w / base**2
  assert np.all((area >= 0.9) & (area <= 1.0))
  assert np.all(np.maximum(h / w, w / h) <= 4.0)
  assert [base, base] in table.tolist()
  assert sorted(map(tuple, table[:, ::-1].tolist())) == sorted(map(tuple, table.tolist()))
  assert np.all(np.diff(h / w) >= 0)  # Sorted by aspect ratio.
  # Only base / divisor matters: the same grid-unit table, scaled.
  units = base // divisor
  np.testing.assert_array_equal(table, buckets.bucket_table(units, 1) * divisor)


def diffusers_tables(name: str) -> dict:
  """The ASPECT_RATIO_* dicts of an installed diffusers pipeline module, read from its source
  (importing it would import torch)."""
  spec = importlib.util.find_spec("diffusers")
  if spec is None:
    pytest.skip("diffusers is not installed")
  path = os.path.join(os.path.dirname(spec.origin), "pipelines", "pixart_alpha", f"{name}.py")
  tree = ast.parse(open(path).read())
  return {
    node.targets[0].id: ast.literal_eval(node.value)
    for node in tree.body
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "").startswith("ASPECT")
  }


def test_bucket_table_holds_pixart_tables():
  alpha = diffusers_tables("pipeline_pixart_alpha")
  sigma = diffusers_tables("pipeline_pixart_sigma")
  tables = [
    (alpha["ASPECT_RATIO_1024_BIN"], 1024),
    (alpha["ASPECT_RATIO_512_BIN"], 512),
    (alpha["ASPECT_RATIO_256_BIN"], 256),
    (sigma["ASPECT_RATIO_2048_BIN"], 2048),
  ]
  for reference, base in tables:
    ours = {tuple(s) for s in buckets.bucket_table(base, base // 16).tolist()}
    theirs = {(int(h), int(w)) for h, w in reference.values()}
    assert theirs <= ours, sorted(theirs - ours)
  assert len(buckets.bucket_table(1024, 64)) == 41
  assert len(buckets.bucket_table(1024, 64, max_ratio=2.0)) < 41


def test_bucket_table_errors():
  with pytest.raises(ValueError, match="multiple of the divisor 3"):
    buckets.bucket_table(16, 3)
  with pytest.raises(ValueError, match="divisor must be a positive integer"):
    buckets.bucket_table(16, 0)
  with pytest.raises(ValueError, match="max_ratio must be >= 1"):
    buckets.bucket_table(16, 2, max_ratio=0.5)
  assert buckets.default_divisor(1024, 2) == 64
  assert buckets.default_divisor(16, 4) == 4
  assert buckets.default_divisor(256, 2) == 16


def test_nearest_bucket():
  table = buckets.bucket_table(16, 4)  # 8x32, 12x20, 16x16, 20x12, 32x8.
  assert table.tolist() == [[8, 32], [12, 20], [16, 16], [20, 12], [32, 8]]
  got = buckets.nearest_bucket([10, 40, 16, 17, 12, 26, 100], [40, 10, 16, 16, 20, 14, 10], table)
  np.testing.assert_array_equal(got, [0, 4, 2, 2, 1, 3, 4])
  # A transposed image gets the transposed bucket.
  hw = np.random.default_rng(0).integers(5, 200, (50, 2))
  a = buckets.nearest_bucket(hw[:, 0], hw[:, 1], table)
  b = buckets.nearest_bucket(hw[:, 1], hw[:, 0], table)
  np.testing.assert_array_equal(table[a], table[b][:, ::-1])
  # Equal ratios (two squares): the larger area wins.
  assert buckets.nearest_bucket([3], [3], np.array([[19, 19], [20, 20]])).tolist() == [1]
  with pytest.raises(ValueError, match="positive"):
    buckets.nearest_bucket([0], [4], table)


def test_merge_small_buckets():
  table = buckets.bucket_table(16, 4)
  # Bucket 1 (12x20) is too small for batches of 4: it joins the nearest big one, 16x16.
  np.testing.assert_array_equal(
    buckets.merge_small_buckets([4, 2, 5, 0, 4], table, 4), [0, 2, 2, 3, 4]
  )
  # None is big enough: all go to the most populous.
  np.testing.assert_array_equal(buckets.merge_small_buckets([1, 0, 2, 1, 0], table, 4), [2] * 5)


def test_cover_crop():
  # A 20 x 40 image whose left and right quarters differ from its middle.
  image = np.zeros((20, 40), np.uint8)
  image[:, 10:30] = 255
  arr = preprocess.cover_crop(Image.fromarray(image), 10, 10)  # Covers as 10 x 20, crops 10x10.
  assert arr.shape == (10, 10, 1) and arr.min() > 200  # The middle only.
  wide = preprocess.cover_crop(Image.fromarray(image), 8, 24)  # Covers as 12 x 24.
  assert wide.shape == (8, 24, 1)
  square = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 45, 3), np.uint8))
  np.testing.assert_array_equal(
    preprocess.center_crop(square, 12), preprocess.cover_crop(square, 12, 12)
  )
  out = preprocess.preprocess(square, (8, 12), channels=1, flip=True)
  assert out.shape == (8, 12, 1) and out.dtype == np.float32


# ---- The pipeline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp("buckets"))


def test_batches_are_one_bucket_each_and_deterministic(folder):
  it = pipeline.make_train_iterator(data_config(folder), global_batch_size=4, seed=0)
  table = buckets.bucket_table(16, 1)
  assert len(it.bucket_sizes) == 5 and all(s in table.tolist() for s in it.bucket_sizes)
  batches = take(it, 12)
  shapes = {b["image"].shape for b in batches}
  assert {s[1:3] for s in shapes} == {tuple(s) for s in it.bucket_sizes}  # Every bucket seen.
  assert all(s[0] == 4 and s[3] == 3 for s in shapes)
  # Each batch's images are of its bucket's aspect ratio (nearest of the table).
  for b in batches:
    assert np.all(b["image"] >= -1) and np.all(b["image"] <= 1)
  again = take(pipeline.make_train_iterator(data_config(folder), global_batch_size=4, seed=0), 12)
  for a, b in zip(batches, again, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other = take(pipeline.make_train_iterator(data_config(folder), global_batch_size=4, seed=1), 12)
  assert [b["image"].shape for b in other] != [b["image"].shape for b in batches]


def test_batches_do_not_depend_on_the_process_count(folder):
  one = take(pipeline.make_train_iterator(data_config(folder), global_batch_size=4, seed=3), 6)
  parts = [
    take(
      pipeline.make_train_iterator(
        data_config(folder), global_batch_size=4, seed=3, process_index=p, process_count=2
      ),
      6,
    )
    for p in range(2)
  ]
  for k, whole in enumerate(one):
    joined = np.concatenate([parts[0][k]["image"], parts[1][k]["image"]])
    np.testing.assert_array_equal(whole["image"], joined)


def test_resume_gives_the_exact_next_batches(folder):
  full = take(pipeline.make_train_iterator(data_config(folder), global_batch_size=4, seed=0), 9)
  it = pipeline.make_train_iterator(data_config(folder), global_batch_size=4, seed=0)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # As a checkpoint stores it.
  assert state["step"] == 5 and len(state["buckets"]) == 5
  resumed = pipeline.make_train_iterator(data_config(folder), global_batch_size=4, seed=0)
  resumed.set_state(state)
  for want, got in zip(full[5:], take(resumed, 4), strict=True):
    np.testing.assert_array_equal(want["image"], got["image"])
  # An epoch is 10 batches (5 buckets of 8 records, batches of 4); later epochs reshuffle.
  plan = resumed.buckets
  assert plan.batches_per_epoch == 10
  rows = np.concatenate([plan[k][1] for k in range(10)])
  assert sorted(rows.tolist()) == list(range(40))  # An epoch sees every record once.
  square = pipeline.make_train_iterator(
    data_config(folder, buckets=False), global_batch_size=4, seed=0
  )
  with pytest.raises(ValueError, match="aspect-ratio buckets"):
    square.set_state(state)


def test_buckets_off_is_the_square_pipeline(folder):
  off = pipeline.make_train_iterator(
    data_config(folder, buckets=False), global_batch_size=4, seed=0
  )
  absent = dict(data_config(folder))
  del absent["buckets"]
  plain = pipeline.make_train_iterator(absent, global_batch_size=4, seed=0)
  for a, b in zip(take(off, 3), take(plain, 3), strict=True):
    assert a["image"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(a["image"], b["image"])
  assert "buckets" not in off.get_state() and off.buckets is None


def test_bucket_errors(folder, tmp_path):
  with pytest.raises(ValueError, match="image folder or caption folder"):
    pipeline.make_train_iterator(
      dict(name="digits", buckets=True, resolution=8), global_batch_size=4, seed=0
    )
  with pytest.raises(ValueError, match="bucket_divisor=3 must be a multiple of the model's patch"):
    pipeline.make_train_iterator(
      data_config(folder, bucket_divisor=3), global_batch_size=4, seed=0, size_multiple=2
    )
  # A manifest's sizes are used as given (no header read): the file is 16x16, listed as wide.
  os.makedirs(tmp_path / "caps")
  Image.new("RGB", (16, 16)).save(tmp_path / "caps" / "a.png")
  with open(tmp_path / "caps" / "metadata.jsonl", "w") as f:
    f.write(json.dumps({"file_name": "a.png", "text": "x", "height": 10, "width": 40}) + "\n")
  config = dict(name="captions", path=str(tmp_path / "caps"), resolution=16, buckets=True)
  it = pipeline.make_train_iterator(config, global_batch_size=2, seed=0, size_multiple=4)
  assert it.bucket_sizes == [[8, 32]] and next(it)["image"].shape == (2, 8, 32, 3)


# ---- Training ---------------------------------------------------------------------------------

# Two buckets at base 16 with divisor 4 (of 8x32, 12x20, 16x16, 20x12, 32x8): 16x16 and 8x32.
TRAIN_SHAPES = [(16, 16), (10, 40)]


def bucket_config(folder, **overrides):
  config = tiny_config(
    **{"data.name": "folder", "data.path": folder, "data.resolution": 16, "model.input_size": 16},
    **{"batch_size": 4, "ckpt_every": 100, "optim.schedule": "constant", **overrides},
  )
  with config.data.unlocked():
    config.data.buckets = True
    config.data.bucket_divisor = 4
    config.data.num_threads = 2
  return config


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp("train_buckets"), per_shape=4, shapes=TRAIN_SHAPES)


@pytest.fixture(scope="module")
def whole_run(train_folder, tmp_path_factory, compilation_cache):
  """3 uninterrupted steps over two buckets: (final state, image shapes the step was traced for,
  image shapes the loop compiled it for, the shapes of the 3 batches)."""
  config = bucket_config(train_folder, total_steps=3)
  seen = [b["image"].shape[1:3] for b in take(train.make_data_iterator(config), 3)]
  traces = []
  make = train.make_update_fn

  def counting(*args, **kwargs):
    update = make(*args, **kwargs)

    def traced(state, batch, frozen=None):
      traces.append(tuple(batch["image"].shape[-3:-1]))  # A Python side effect: per trace.
      return update(state, batch, frozen)

    return traced

  compiles = []
  compile_step = train.Throughput.compile

  def compile_counting(self, step_fn, state, batch, *rest):
    compiles.append(tuple(batch["image"].shape[-3:-1]))
    return compile_step(self, step_fn, state, batch, *rest)

  with pytest.MonkeyPatch.context() as m:
    m.setattr(train, "make_update_fn", counting)
    m.setattr(train.Throughput, "compile", compile_counting)
    state = train.train_and_evaluate(config, str(tmp_path_factory.mktemp("whole") / "run"))
  return jax.device_get(state), traces, compiles, seen


def test_train_compiles_once_per_bucket(whole_run):
  state, traces, compiles, seen = whole_run
  assert int(state["step"]) == 3
  assert sorted(set(seen)) == [(8, 32), (16, 16)] and len(seen) == 3  # A bucket comes back.
  # One trace and one compile per bucket, not per step (pmap: a device's (h, w)).
  assert sorted(traces) == sorted(compiles) == [(8, 32), (16, 16)]


@pytest.mark.usefixtures("compilation_cache")
def test_train_resumes_exactly(whole_run, train_folder, tmp_path):
  """Stopped after 2 steps and resumed: the same batches, so the same parameters."""
  train.train_and_evaluate(bucket_config(train_folder, total_steps=2), str(tmp_path / "run"))
  resumed = train.train_and_evaluate(
    bucket_config(train_folder, total_steps=3), str(tmp_path / "run")
  )
  resumed = jax.device_get(resumed)
  assert int(resumed["step"]) == 3
  jax.tree.map(np.testing.assert_array_equal, resumed["params"], whole_run[0]["params"])


# ---- Sampling at other sizes ------------------------------------------------------------------


def test_sample_shape_errors():
  config = tiny_config()  # Trained at 8x8, patch 2.
  assert generate.sample_shape(config, 3) == (3, 8, 8, 1)
  assert generate.sample_shape(config, 3, width=6) == (3, 8, 6, 1)
  with pytest.raises(UserError, match=r"height 7 is not a multiple of 2 pixels \(patch_size 2\)"):
    generate.sample_shape(config, 2, height=7)
  with pytest.raises(UserError, match="positive number of pixels"):
    generate.sample_shape(config, 1, width=0)


def test_sample_shape_of_a_latent_model(tmp_path):
  """Pixels -> latents by the VAE factor (read from its config.json: 3 levels = 4x)."""
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"block_out_channels": [32, 32, 32]}, f)
  config = ml_collections.ConfigDict(
    {
      "model": {"input_size": 8, "patch_size": 2, "in_channels": 4},
      "vae": {"path": str(tmp_path)},
    }
  )
  assert generate.vae_factor(config) == 4
  assert generate.sample_shape(config, 2, height=32, width=64) == (2, 8, 16, 4)
  with pytest.raises(UserError, match=r"width 36 .* 8 pixels \(patch_size 2 x VAE factor 4\)"):
    generate.sample_shape(config, 2, height=32, width=36)
  sizes = generate.size_cond(ml_collections.ConfigDict({**config, "model": {
    **config.model, "size_conditioning": True}}), 2, size=(8, 16))  # fmt: skip
  np.testing.assert_array_equal(sizes["resolution"], [[64, 128]] * 2)
  np.testing.assert_allclose(sizes["aspect_ratio"], [[0.5]] * 2)


def test_sample_at_a_non_square_size(tmp_path, monkeypatch, capsys):
  """dit.sample --height/--width on a model trained at 8x8 (sin-cos positions, no config
  change): samples of 8x12, and a clear refusal of a width of 9."""
  from test_early_checks import run_command_here, write_tiny_workdir

  from dit import sample

  workdir = write_tiny_workdir(tmp_path / "run")
  out = tmp_path / "wide.npz"
  args = [f"--workdir={workdir}", "--num=2", "--steps=2", "--labels=1,7", f"--out={out}"]
  code, _, err = run_command_here(
    sample, *args, "--height=8", "--width=12", monkeypatch=monkeypatch, capsys=capsys
  )
  assert code == 0, err
  got = np.load(out)["images"]
  assert got.shape == (2, 8, 12, 1) and got.std() > 1  # Not a constant image.
  code, _, err = run_command_here(
    sample, *args, "--width=9", monkeypatch=monkeypatch, capsys=capsys
  )
  assert code == 2 and "width 9 is not a multiple of 2 pixels" in err and "8 or 10" in err
