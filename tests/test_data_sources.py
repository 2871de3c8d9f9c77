"""Image folders, caption sets and TFDS datasets built on the fly; preprocessing; bad input."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from dit.data import make_train_iterator, preprocess
from dit.data.folders import CaptionFolderSource, ImageFolderSource
from dit.data.pipeline import Loader

COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}


def solid(color, size=(12, 10), mode="RGB"):
  return Image.new(mode, size, color)


def make_folder(root, per_class=4, fmt="png"):
  for name, color in COLORS.items():
    os.makedirs(root / name)
    for i in range(per_class):
      solid(color, size=(12 + i, 10)).save(root / name / f"{i}.{fmt}")
  return root


def to_rgb(images):
  """Batch in [-1, 1] -> mean colour per row, uint8-ish."""
  return np.round((images.mean(axis=(1, 2)) + 1) * 127.5)


# ----------------------------------------------------------------------------- preprocessing


def test_center_crop_matches_adm_reference():
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
  out = preprocess.center_crop(image, 12)
  # ADM: halve with BOX while short side >= 2R (50 -> 25 -> 12), bicubic to short side R
  # (a no-op here), center crop.
  ref = image.resize((45, 25), Image.BOX).resize((22, 12), Image.BOX)
  np.testing.assert_array_equal(out, np.asarray(ref)[:, 5:17])
  assert out.shape == (12, 12, 3) and out.dtype == np.uint8
  # 40 -> 20 (< 24): bicubic resize to short side 12, then crop.
  small = Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8))
  ref = np.asarray(small.resize((15, 20), Image.BOX).resize((12, 16), Image.BICUBIC))
  np.testing.assert_array_equal(preprocess.center_crop(small, 12)[..., 0], ref[2:14])


def test_preprocess_range_flip_and_modes():
  ramp = np.tile(np.arange(16, dtype=np.uint8)[None, :] * 17, (16, 1))
  x = preprocess.preprocess(Image.fromarray(ramp), 16, channels=3)
  assert x.shape == (16, 16, 3) and x.dtype == np.float32
  assert x.min() == -1.0 and x.max() == 1.0  # 0 -> -1, 255 -> 1.
  np.testing.assert_array_equal(x[..., 0], x[..., 2])  # Grey -> RGB repeats the channel.
  f = preprocess.preprocess(Image.fromarray(ramp), 16, channels=1, flip=True)
  np.testing.assert_array_equal(f[..., 0], x[:, ::-1, 0])


def test_mode_conversions():
  # 16-bit greyscale is rescaled, not clipped.
  sixteen = Image.fromarray(np.full((4, 4), 200 * 257, np.uint16))  # 16-bit 200.
  assert sixteen.mode.startswith("I")
  np.testing.assert_array_equal(np.asarray(preprocess.to_mode(sixteen, 3)), 200)
  # Transparent RGBA is composited on white; opaque pixels keep their colour.
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[:2] = (10, 20, 30, 255)
  out = np.asarray(preprocess.to_mode(Image.fromarray(rgba), 3))
  np.testing.assert_array_equal(out[:2], np.broadcast_to([10, 20, 30], (2, 4, 3)))
  np.testing.assert_array_equal(out[2:], 255)
  palette = solid((0, 255, 0)).convert("P")
  np.testing.assert_array_equal(np.asarray(preprocess.to_mode(palette, 3))[0, 0], (0, 255, 0))
  cmyk = solid((255, 0, 0)).convert("CMYK")
  assert preprocess.to_mode(cmyk, 3).mode == "RGB"
  with pytest.raises(ValueError, match="channels must be 1 or 3"):
    preprocess.to_mode(cmyk, 4)


# ----------------------------------------------------------------------------- image folders


def test_image_folder_labels_shapes_and_determinism(tmp_path):
  root = make_folder(tmp_path / "imgs")
  cfg = {"name": "folder", "path": str(root), "resolution": 8}
  it = make_train_iterator(cfg, global_batch_size=6, seed=0)
  seen, batches = [], []
  for _ in range(2):  # One epoch of 12 images.
    batch = next(it)
    batches.append(batch)
    assert batch["image"].shape == (6, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    colors = list(COLORS.values())
    for rgb, label in zip(to_rgb(batch["image"]), batch["label"], strict=True):
      np.testing.assert_array_equal(rgb, colors[label])  # cat=0 red, dog=1 blue, eel=2 green.
    seen.extend(batch["label"])
  assert sorted(seen) == [0] * 4 + [1] * 4 + [2] * 4
  again = make_train_iterator(cfg, global_batch_size=6, seed=0)
  for want in batches:
    np.testing.assert_array_equal(next(again)["image"], want["image"])


def test_image_folder_two_processes_and_restore(tmp_path):
  root = make_folder(tmp_path / "imgs")
  cfg = {"name": "folder", "path": str(root), "resolution": 8, "num_threads": 2}
  full = make_train_iterator(cfg, global_batch_size=4, seed=1)
  procs = [
    make_train_iterator(cfg, global_batch_size=4, seed=1, process_index=p, process_count=2)
    for p in (0, 1)
  ]
  for _ in range(4):
    want = next(full)
    got = [next(p) for p in procs]
    np.testing.assert_array_equal(np.concatenate([g["image"] for g in got]), want["image"])
  state = procs[1].get_state()
  want = next(procs[1])
  restored = make_train_iterator(cfg, global_batch_size=4, seed=1, process_index=1, process_count=2)
  restored.set_state(state)
  np.testing.assert_array_equal(next(restored)["image"], want["image"])


def test_grey_rgba_16bit_and_jpeg_files(tmp_path):
  root = tmp_path / "mixed"
  os.makedirs(root / "a")
  solid(128, mode="L").save(root / "a" / "grey.png")
  solid((0, 0, 0, 0), mode="RGBA").save(root / "a" / "clear.png")
  Image.fromarray(np.full((10, 12), 65535, np.uint16)).save(root / "a" / "deep.png")
  solid((200, 100, 0)).save(root / "a" / "photo.JPG", quality=95)
  source = ImageFolderSource(str(root))
  loader = Loader(source, resolution=4, channels=3, random_flip=False)
  rgb = {
    os.path.basename(p): to_rgb(loader(i)["image"][None])[0] for i, p in enumerate(source.paths)
  }
  np.testing.assert_array_equal(rgb["grey.png"], (128, 128, 128))
  np.testing.assert_array_equal(rgb["clear.png"], (255, 255, 255))
  np.testing.assert_array_equal(rgb["deep.png"], (255, 255, 255))
  np.testing.assert_allclose(rgb["photo.JPG"], (200, 100, 0), atol=3)
  batch = next(
    make_train_iterator(
      {"name": "folder", "path": str(root), "resolution": 4}, global_batch_size=4, seed=0
    )
  )
  assert batch["image"].shape == (4, 4, 4, 3)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_bad_image_skipped_and_counted_or_raises(tmp_path, damage):
  root = make_folder(tmp_path / "imgs", per_class=2)
  bad = root / "dog" / "bad.png"
  if damage == "garbage":
    bad.write_bytes(b"this is not an image at all")
  else:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
      buffer, format="PNG"
    )
    bad.write_bytes(buffer.getvalue()[:200])
  cfg = {"name": "folder", "path": str(root), "resolution": 8}
  it = make_train_iterator(cfg, global_batch_size=7, seed=0)
  batch = next(it)  # One full epoch of 7 files, one unreadable.
  assert batch["image"].shape == (7, 8, 8, 3)
  assert it.num_bad_images == 1
  it = make_train_iterator(dict(cfg, on_bad_image="raise"), global_batch_size=7, seed=0)
  with pytest.raises(ValueError, match="bad.png"):
    next(it)


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ImageFolderSource(str(tmp_path / "nope"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="no class subfolders"):
    ImageFolderSource(str(tmp_path / "empty"))
  os.makedirs(tmp_path / "empty" / "cls")
  (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="no images"):
    ImageFolderSource(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- captions


def test_captions_from_txt_files(tmp_path):
  root = tmp_path / "caps"
  os.makedirs(root / "sub")
  for i, (name, color) in enumerate(COLORS.items()):
    solid(color).save(root / ("sub" if i else "") / f"{name}.png")
    (root / ("sub" if i else "") / f"{name}.txt").write_text(f"a {name} \n")
  it = make_train_iterator(
    {"name": "captions", "path": str(root), "resolution": 8}, global_batch_size=3, seed=0
  )
  batch = next(it)
  assert sorted(batch["caption"]) == ["a cat", "a dog", "a eel"]
  for caption, rgb in zip(batch["caption"], to_rgb(batch["image"]), strict=True):
    np.testing.assert_array_equal(rgb, COLORS[caption[2:]])
  np.testing.assert_array_equal(batch["label"], 0)


def test_captions_from_manifest_and_missing(tmp_path):
  root = tmp_path / "caps"
  os.makedirs(root)
  for name, color in COLORS.items():
    solid(color).save(root / f"{name}.png")
  rows = [{"file_name": "cat.png", "text": "red"}, {"image": "dog.png", "caption": "blue"}]
  rows.append({"file_name": "eel.png", "label": 2})  # No caption.
  (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  with pytest.raises(FileNotFoundError, match="eel.png.*no caption"):
    CaptionFolderSource(str(root))
  skip = CaptionFolderSource(str(root), missing_caption="skip")
  assert [skip[i]["caption"] for i in range(len(skip))] == ["red", "blue"]
  empty = CaptionFolderSource(str(root / "metadata.jsonl"), missing_caption="empty")
  assert empty[2]["caption"] == "" and empty[2]["label"] == 2
  # .txt captions: one image has none.
  txt = tmp_path / "txt"
  os.makedirs(txt)
  solid((1, 2, 3)).save(txt / "a.png")
  solid((1, 2, 3)).save(txt / "b.png")
  (txt / "a.txt").write_text("only a")
  with pytest.raises(FileNotFoundError, match="b.png"):
    CaptionFolderSource(str(txt))
  assert len(CaptionFolderSource(str(txt), missing_caption="skip")) == 1
  with pytest.raises(FileNotFoundError, match="manifest"):
    CaptionFolderSource(str(tmp_path / "none.jsonl"))
  (txt / "bad.jsonl").write_text("not json\n")
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    CaptionFolderSource(str(txt / "bad.jsonl"))


# ----------------------------------------------------------------------------- TFDS


tfds = pytest.importorskip("tensorflow_datasets")


def _png(color):
  buffer = io.BytesIO()
  solid(color).save(buffer, format="PNG")
  buffer.seek(0)
  return buffer


class TinyColors(tfds.core.GeneratorBasedBuilder):
  """A 9-image TFDS dataset (encoded PNG bytes: written without TensorFlow)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=list(COLORS)),
          "caption": tfds.features.Text(),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(9):
      name = list(COLORS)[i % 3]
      yield i, {"image": _png(COLORS[name]), "label": i % 3, "caption": f"a {name}"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  TinyColors(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source_reads_prepared_array_record(tfds_dir):
  cfg = {
    "name": "tfds:tiny_colors",
    "data_dir": tfds_dir,
    "resolution": 8,
    "caption_key": "caption",
  }
  it = make_train_iterator(cfg, global_batch_size=9, seed=0)
  batch = next(it)
  assert batch["image"].shape == (9, 8, 8, 3) and batch["label"].dtype == np.int32
  assert sorted(batch["label"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  for rgb, label, caption in zip(
    to_rgb(batch["image"]), batch["label"], batch["caption"], strict=True
  ):
    name = list(COLORS)[label]
    np.testing.assert_array_equal(rgb, COLORS[name])
    assert caption == f"a {name}"
  # Two processes: disjoint halves of the same global batch; state restores.
  procs = [
    make_train_iterator(cfg, global_batch_size=6, seed=2, process_index=p, process_count=2)
    for p in (0, 1)
  ]
  full = make_train_iterator(cfg, global_batch_size=6, seed=2)
  for _ in range(3):
    want, got = next(full), [next(p) for p in procs]
    np.testing.assert_array_equal(np.concatenate([g["label"] for g in got]), want["label"])
  state = full.get_state()
  want = next(full)
  again = make_train_iterator(cfg, global_batch_size=6, seed=2)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["image"], want["image"])


def test_tfds_not_prepared_says_how_to_prepare(tmp_path, tfds_dir):
  with pytest.raises(FileNotFoundError, match="tfds build cifar10 .*--file_format=array_record"):
    make_train_iterator(
      {"name": "tfds:cifar10", "data_dir": str(tmp_path)}, global_batch_size=2, seed=0
    )
  assert not (tmp_path / "cifar10").exists() or not any(
    (tmp_path / "cifar10").rglob("*.array_record*")
  )
  with pytest.raises(FileNotFoundError, match="neither registered nor prepared"):
    make_train_iterator(
      {"name": "tfds:no_such_set", "data_dir": str(tmp_path)}, global_batch_size=2, seed=0
    )
  with pytest.raises(ValueError, match="no feature 'text'"):
    make_train_iterator(
      {"name": "tfds:tiny_colors", "data_dir": tfds_dir, "caption_key": "text"},
      global_batch_size=2,
      seed=0,
    )


def test_tfds_digits_builder(tmp_path):
  from dit.data import tfds as dit_tfds
  from dit.data.digits import digit_caption, load_digits_arrays

  dit_tfds.prepare_digits(str(tmp_path))
  cfg = {
    "name": "tfds:sklearn_digits",
    "data_dir": str(tmp_path),
    "resolution": 8,
    "channels": 1,
    "caption_key": "caption",
    "random_flip": False,
  }
  it = make_train_iterator(cfg, global_batch_size=16, seed=0)
  batch = next(it)
  assert it.num_records == 1797 and batch["image"].shape == (16, 8, 8, 1)
  images, labels = load_digits_arrays(8)
  for image, label, caption in zip(batch["image"], batch["label"], batch["caption"], strict=True):
    assert caption == digit_caption(label)
    # Same pixels as the embedded source up to 8-bit quantisation.
    err = np.abs(images - image).max(axis=(1, 2, 3))
    assert err.min() <= 1 / 127.5 and labels[err.argmin()] == label
