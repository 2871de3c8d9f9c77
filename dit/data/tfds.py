"""TFDS datasets through `tfds.data_source` (ArrayRecord, random access, no TensorFlow).

`config.data.name = "tfds:cifar10"` reads data prepared under `config.data.data_dir`
or `$TFDS_DATA_DIR`. Nothing is downloaded at training time. Also defines the
`sklearn_digits` builder: the embedded digits as a real TFDS dataset, built
without TensorFlow (images are passed to TFDS as encoded PNG bytes).
"""

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dit.data import digits


def _prepare_help(name: str, data_dir: str) -> str:
  return (
    f"Nothing is downloaded at training time. Prepare it once, offline, where TensorFlow is "
    f"installed (`pip install tensorflow tensorflow-datasets`): `tfds build {name} "
    f"--data_dir={data_dir} --file_format=array_record` (datasets with manual downloads such "
    f"as imagenet2012 need the archives in --manual_dir first), then copy the directory here "
    f"and point $TFDS_DATA_DIR or config.data.data_dir at it. A dataset prepared as tfrecord "
    f"can be converted with `tfds convert_format --dataset_dir=DIR/<name> "
    f"--out_file_format=array_record`."
  )


class TfdsSource:
  """Random-access records {"image": encoded bytes | uint8 array, "label": int32[, "caption"]}.

  Args:
    name: TFDS name, optionally with config/version ("cifar10", "imagenet2012:5.1.0").
    split: TFDS split string ("train", "train[:90%]").
    data_dir: prepared data root; default $TFDS_DATA_DIR, then ~/tensorflow_datasets.
    image_key, label_key, caption_key: feature names; label_key/caption_key may be None.
  """

  def __init__(
    self,
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    image_key: str = "image",
    label_key: str | None = "label",
    caption_key: str | None = None,
  ):
    data_dir = (
      data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    )
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise FileNotFoundError(
        f"TFDS dataset {name!r} is neither registered nor prepared in data_dir={data_dir!r}. "
        + _prepare_help(name, data_dir)
      ) from e
    if not builder.is_prepared():
      raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} (no "
        f"{builder.data_dir}/dataset_info.json). " + _prepare_help(name, data_dir)
      )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(
        f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
        f"{builder.info.file_format.value}; random access needs array_record. "
        + _prepare_help(name, data_dir)
      )
    features = builder.info.features
    for key in (image_key, label_key, caption_key):
      if key is not None and key not in features:
        raise ValueError(
          f"TFDS dataset {name!r} has no feature {key!r}; features: {sorted(features.keys())}"
        )
    # Decode images ourselves (PIL), so every source shares mode conversion and bad-file handling.
    decoders = None
    if isinstance(features[image_key], tfds.features.Image):
      decoders = {image_key: tfds.decode.SkipDecoding()}
    self.name = name
    self.source = builder.as_data_source(split=split, decoders=decoders)
    self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
    label = features[label_key] if label_key else None
    self.num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else None

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    row = self.source[index]
    record = {
      "image": row[self.image_key],
      "label": np.int32(row[self.label_key] if self.label_key else 0),
    }
    if self.caption_key:
      caption = row[self.caption_key]
      record["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    return record

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, n={len(self)})"


def _png(array: np.ndarray) -> io.BytesIO:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  buffer.seek(0)
  return buffer


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits as a TFDS dataset (8-bit PNGs, label, caption)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS looks for checksum/metadata files beside a builder defined in a package through
    # `importlib_resources`, which it does not install on Python >= 3.9. There are none here.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="scikit-learn load_digits: 1797 8x8 greyscale digits (0..16 scaled to 0..255).",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 1)),
          "label": tfds.features.ClassLabel(names=list(digits.DIGIT_NAMES)),
          "caption": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Embedded data: nothing to download.
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    images, labels = digits.load_digits_arrays(8)
    pixels = np.round((images + 1.0) * 127.5).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
      yield (
        i,
        {"image": _png(image[..., 0]), "label": int(label), "caption": digits.digit_caption(label)},
      )


def prepare_digits(data_dir: str) -> None:
  """Writes `sklearn_digits` as ArrayRecord under `data_dir` (no TensorFlow, no download)."""
  SklearnDigits(data_dir=data_dir, file_format="array_record").download_and_prepare()
