"""Digits data and the Grain training iterator: order, sharding, flips, state restore."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from dit.data import digits, load_digits_arrays, make_train_iterator
from dit.data.pipeline import Loader, TrainIterator


class IndexSource:
  """Record i has label i and a (2, 3, 1) image whose columns are i, i+0.1, i+0.2."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = (i + np.array([0.0, 0.1, 0.2], np.float32))[None, :, None].repeat(2, 0)
    return {"image": image, "label": np.int32(i)}


def index_iterator(n=30, batch=6, seed=0, flip=False, **kw):
  loader = Loader(IndexSource(n), resolution=2, channels=1, random_flip=flip)
  return TrainIterator(loader, global_batch_size=batch, seed=seed, **kw)


def digits_config(**kw):
  c = ml_collections.ConfigDict(dict(name="digits", resolution=16, **kw))
  c.lock()
  return c


def test_load_digits_arrays_matches_sklearn():
  images, labels = load_digits_arrays(8)
  ref = load_digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
  np.testing.assert_allclose(images[..., 0], ref.images / 8.0 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(labels, ref.target)
  assert labels.dtype == np.int32
  up, _ = load_digits_arrays(16)
  assert up.shape == (1797, 16, 16, 1) and up.min() >= -1.0 and up.max() <= 1.0
  # Bilinear upsampling, half-pixel centres: the same as jax.image.resize "linear".
  ref_up = jax.image.resize(images, (1797, 16, 16, 1), "linear")
  np.testing.assert_allclose(up, ref_up, atol=1e-5)


def test_digits_iterator_batches():
  it = make_train_iterator(digits_config(), global_batch_size=32, seed=0)
  batch = next(it)
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
  # Rows are real digits with their labels.
  images, labels = load_digits_arrays(16)
  for image, label in zip(batch["image"], batch["label"], strict=True):
    matches = np.flatnonzero((images == image).all(axis=(1, 2, 3)))
    assert len(matches) >= 1 and labels[matches[0]] == label


def test_digits_captions_and_channels():
  it = make_train_iterator(digits_config(captions=True, channels=3), global_batch_size=8, seed=1)
  batch = next(it)
  assert batch["image"].shape == (8, 16, 16, 3)
  assert batch["caption"].shape == (8,)
  for caption, label in zip(batch["caption"], batch["label"], strict=True):
    assert caption == f"a handwritten digit {digits.DIGIT_NAMES[label]}"


def test_epochs_are_permutations_reshuffled_per_epoch():
  it = index_iterator(n=30, batch=4)  # Batches straddle epochs: 30 = 7.5 batches.
  labels = np.concatenate([next(it)["label"] for _ in range(15)])
  epoch0, epoch1 = labels[:30], labels[30:]
  assert sorted(epoch0) == list(range(30)) and sorted(epoch1) == list(range(30))
  assert not np.array_equal(epoch0, epoch1)
  assert not np.array_equal(epoch0, np.arange(30))


def test_deterministic_given_seed():
  a = [next(it)["label"] for it in [index_iterator(seed=3)] for _ in range(7)]
  b = [next(it)["label"] for it in [index_iterator(seed=3)] for _ in range(7)]
  c = [next(it)["label"] for it in [index_iterator(seed=4)] for _ in range(7)]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("flip", [False, True])
def test_two_processes_are_disjoint_and_form_the_global_batch(flip):
  single = index_iterator(n=30, batch=6, flip=flip)
  procs = [
    index_iterator(n=30, batch=6, flip=flip, process_index=p, process_count=2) for p in (0, 1)
  ]
  for _ in range(12):  # Crosses epoch boundaries.
    full = next(single)
    parts = [next(p) for p in procs]
    assert all(p["image"].shape == (3, 2, 3, 1) for p in parts)
    assert not set(parts[0]["label"]) & set(parts[1]["label"])
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_random_flip_is_deterministic_and_mirrors():
  plain, flipped = index_iterator(flip=False), index_iterator(flip=True)
  seen = set()
  for _ in range(10):
    a, b = next(plain), next(flipped)
    np.testing.assert_array_equal(a["label"], b["label"])  # Flip does not change the order.
    for x, y in zip(a["image"], b["image"], strict=True):
      is_flipped = np.array_equal(y, x[:, ::-1])
      assert is_flipped or np.array_equal(y, x)
      seen.add(is_flipped)
  assert seen == {True, False}
  again = index_iterator(flip=True)
  np.testing.assert_array_equal(next(again)["image"], next(index_iterator(flip=True))["image"])


def flip_bits(batch):
  """Which rows of an IndexSource batch are mirrored (columns i+0.2, i+0.1, i)."""
  image = batch["image"]
  return image[:, 0, 0, 0] > image[:, 0, 2, 0]


def test_random_flips_are_drawn_afresh_for_every_batch():
  """The flips of global batch k come from (seed, k): they change from batch to batch and,
  for one record, from epoch to epoch, at a rate of one half."""
  it = index_iterator(n=30, batch=6, flip=True)
  patterns, per_record = [], {i: set() for i in range(30)}
  for _ in range(100):  # 20 epochs.
    batch = next(it)
    bits = flip_bits(batch)
    patterns.append(tuple(bits))
    for label, bit in zip(batch["label"], bits, strict=True):
      per_record[int(label)].add(bool(bit))
  # 100 draws of 6 fair bits: ~50 distinct patterns expected; a step-blind draw gives 1.
  assert len(set(patterns)) >= 30, len(set(patterns))
  # Every record is seen both ways (chance of one never flipping in 20 epochs: 2^-19 each).
  assert all(seen == {False, True} for seen in per_record.values()), per_record
  bits = np.asarray(patterns)
  assert abs(bits.mean() - 0.5) < 4 * np.sqrt(0.25 / bits.size), bits.mean()  # 4 sigma.


@pytest.mark.parametrize("num_threads", [0, 2])
def test_state_restores_exact_next_batch(num_threads):
  it = index_iterator(n=30, batch=6, flip=True, num_threads=num_threads)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(5)]  # Crosses into epoch 1.
  restored = index_iterator(n=30, batch=6, flip=True, num_threads=num_threads)
  next(restored)  # State is replaced, not added to.
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert restored.get_state()["step"] == state["step"] + 5


def test_state_restores_on_a_different_process_count():
  single = index_iterator(n=30, batch=6, flip=True)
  for _ in range(3):
    next(single)
  state = single.get_state()
  want = next(single)
  halves = []
  for p in (0, 1):
    it = index_iterator(n=30, batch=6, flip=True, process_index=p, process_count=2)
    it.set_state(state)
    halves.append(next(it))
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), want[key])


def test_digits_state_restore_through_config():
  c = digits_config(random_flip=True)
  it = make_train_iterator(c, global_batch_size=64, seed=7)
  for _ in range(30):  # ~1 epoch.
    next(it)
  state = it.get_state()
  want = next(it)
  again = make_train_iterator(c, global_batch_size=64, seed=7)
  again.set_state(state)
  got = next(again)
  np.testing.assert_array_equal(got["image"], want["image"])
  np.testing.assert_array_equal(got["label"], want["label"])


def test_bad_arguments():
  with pytest.raises(ValueError, match="divisible"):
    index_iterator(batch=5, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    index_iterator(process_index=2, process_count=2)
  with pytest.raises(ValueError, match="seed"):
    index_iterator(seed=-1)
  with pytest.raises(ValueError, match=r"data seed must be in \[0, 2\*\*32\), got 4294967296"):
    index_iterator(seed=2**32)
  assert next(index_iterator(seed=2**32 - 1))["label"].shape == (6,)  # The last valid seed.
  with pytest.raises(ValueError, match="process_index"):
    index_iterator(process_index=-1, process_count=2)
  it = index_iterator(seed=0)
  with pytest.raises(ValueError, match="seed=1"):
    it.set_state({"step": 3, "seed": 1, "global_batch_size": 6, "num_records": 30})
  with pytest.raises(ValueError, match="global_batch_size"):
    it.set_state({"step": 3, "seed": 0, "global_batch_size": 12, "num_records": 30})
  with pytest.raises(ValueError, match="unknown config.data.name='mnist'"):
    make_train_iterator({"name": "mnist"}, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="needs config.data.path"):
    make_train_iterator({"name": "folder"}, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="on_bad_image"):
    make_train_iterator({"name": "digits", "on_bad_image": "ignore"}, global_batch_size=4, seed=0)


class PerRecord:
  """Hides `read_batch`, forcing the per-record path."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.source[i]


def test_vectorised_and_per_record_reads_agree():
  source = digits.DigitsSource(16, captions=True)
  its = [
    TrainIterator(
      Loader(s, resolution=16, channels=3, random_flip=True), global_batch_size=16, seed=5
    )
    for s in (source, PerRecord(source))
  ]
  for _ in range(3):
    a, b = next(its[0]), next(its[1])
    assert a.keys() == b.keys() == {"image", "label", "caption"}
    for key in a:
      assert a[key].dtype == b[key].dtype
      np.testing.assert_array_equal(a[key], b[key])
