"""The FID InceptionV3 (pool3 features and 1008-way logits) in Flax.

This is the network of the TensorFlow FID graph (`inception-2015-12-05`) in the form
pytorch-fid ships it: torchvision's Inception3 with the FID patches (average pools that
exclude padding, a max pool in the last block), 1008 classes, no aux head. Images are
resized to 299x299 with bilinear interpolation (half-pixel centres, no antialiasing, as
`F.interpolate(..., align_corners=False)`), and the pool3 features are the 2048-d output
of the final global average pool.

Weights: pytorch-fid's release asset `pt_inception-2015-12-05-6726825d.pth`
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
Download it once by hand (nothing here downloads). `load_inception_variables` reads that
`.pth` (needs torch), or the same tensors, under the same names, as `.safetensors`/`.npz`
(no torch needed), e.g. after
  `safetensors.torch.save_file(torch.load(pth), "inception.safetensors")`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dit.models import hub_files

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
)
RESOLUTION = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


def _pad(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running stats) -> ReLU, as torchvision's."""

  features: int
  kernel: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x):
    kernel = (self.kernel, self.kernel) if isinstance(self.kernel, int) else self.kernel
    x = nn.Conv(
      self.features,
      kernel,
      strides=(self.stride, self.stride),
      padding=_pad(self.padding),
      use_bias=False,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF's average pool ignores the zero padding (pytorch-fid's count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, 1, name="branch1x1")(x)
    b5 = BasicConv(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
    bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, 1, name="branch1x1")(x)
    b7 = BasicConv(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  pool: str = "avg"  # The FID graph's last block (Mixed_7c) max-pools: pool="max".

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, 1, name="branch1x1")(x)
    b3 = BasicConv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_to_inception(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, 299, 299, C), bilinear with half-pixel centres and no antialias.

  Same as torch's F.interpolate(mode="bilinear", align_corners=False) (pytorch-fid), both
  when upsampling and when downsampling.
  """
  return jax.image.resize(
    x, (x.shape[0], RESOLUTION, RESOLUTION, x.shape[-1]), method="linear", antialias=False
  )


class InceptionV3(nn.Module):
  """The FID InceptionV3. Parameter names follow pytorch-fid's state dict.

  __call__(images) with images (B, H, W, C) float in [-1, 1], C = 3 (or 1: grey is
  repeated to RGB), any H, W (resized to 299). Returns a dict:
    "pool": (B, 2048) pool3 features (FID, precision/recall),
    "logits": (B, 1008) fc(pool) with bias,
    "logits_unbiased": (B, 1008) pool @ W without the bias (as the original TF
      Inception Score code multiplies pool3 by the softmax weights only).
  """

  resize: bool = True

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize:
      x = resize_to_inception(x)
    # pytorch-fid maps [0, 1] inputs to [-1, 1]; ours already are.
    x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(pool="avg", name="Mixed_7b")(x)
    x = InceptionE(pool="max", name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    fc = nn.Dense(NUM_LOGITS, name="fc")
    logits = fc(pool)
    return {
      "pool": pool,
      "logits": logits,
      "logits_unbiased": logits - fc.variables["params"]["bias"],
    }


# Flax leaf name -> PyTorch state-dict suffix.
_LEAF_TO_TORCH = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}


def _torch_name(path: tuple[str, ...]) -> str:
  collection, *modules, leaf = path
  return ".".join([*modules, _LEAF_TO_TORCH[(collection, leaf)]])


@functools.lru_cache(maxsize=1)
def _abstract_variables() -> dict:
  x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
  return jax.eval_shape(lambda x: InceptionV3().init(jax.random.key(0), x), x)


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"Inception weights {path!r} not found. Download pytorch-fid's {FID_WEIGHTS_FILE} "
      f"from {FID_WEIGHTS_URL} (or pass a .safetensors/.npz with the same tensor names)."
    )
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    return dict(load_file(path))
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"Reading the PyTorch file {path!r} needs torch (pip install 'dit[torch]'); or convert "
      "it once to .safetensors with the same tensor names."
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, expected a state dict.")
  return {k: v.detach().float().numpy() for k, v in state.items()}


def load_inception_variables(path: str) -> dict:
  """Reads pytorch-fid's FID Inception weights into Flax variables.

  Args:
    path: `pt_inception-2015-12-05-6726825d.pth` (torch needed), or a `.safetensors` /
      `.npz` holding the same tensors under the same names.
  Returns:
    {"params": ..., "batch_stats": ...} of float32 NumPy arrays for `InceptionV3().apply`.
  """
  state = {k: v for k, v in _read_state_dict(path).items() if "num_batches_tracked" not in k}
  flat = traverse_util.flatten_dict(_abstract_variables())
  names = {_torch_name(p): p for p in flat}
  expected = {}
  for name, p in names.items():
    shape = flat[p].shape
    if len(shape) == 4:  # Flax HWIO <- torch OIHW.
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif len(shape) == 2:  # Flax (in, out) <- torch (out, in).
      shape = shape[::-1]
    expected[name] = shape
  hub_files.check_keys(state, expected, source=path)
  out = {}
  for name, p in names.items():
    w = np.asarray(state[name], np.float32)
    if w.ndim == 4:
      w = w.transpose(2, 3, 1, 0)
    elif w.ndim == 2:
      w = w.T
    out[p] = w
  return traverse_util.unflatten_dict(out)


def init_random_variables(seed: int = 0) -> dict:
  """Random Flax variables (benchmarks, smoke tests); BN stats are mean 0, var 1."""
  x = jnp.zeros((1, 75, 75, 3), jnp.float32)
  return InceptionV3().init(jax.random.key(seed), x)


def make_feature_fn(
  variables: dict, batch_size: int = 50
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """Returns fn(images) -> {"pool": (N, 2048), "logits": (N, 1008), "logits_unbiased"}.

  images: (N, H, W, C) float in [-1, 1], C in {1, 3}, NumPy or JAX; run in batches of
  `batch_size` (the last one padded, so one compilation). Values slightly outside
  [-1, 1] are clipped. For numbers comparable with published FIDs, feed images
  quantised to 8 bits, as the reference batches are.
  """
  model = InceptionV3()
  apply = jax.jit(lambda v, x: model.apply(v, x))
  variables = jax.device_put(variables)  # Once, not on every call.

  def feature_fn(images) -> dict[str, np.ndarray]:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be (N, H, W, 1 or 3), got shape {images.shape}")
    if not np.all(np.isfinite(images)):
      bad = int(np.sum(~np.all(np.isfinite(images), axis=(1, 2, 3))))
      raise ValueError(f"{bad} of {len(images)} images contain NaN or inf values")
    lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
    if lo < -1.5 or hi > 1.5:
      raise ValueError(
        f"images must be in [-1, 1]; got values in [{lo:g}, {hi:g}] (uint8 images: x/127.5-1)"
      )
    images = np.clip(images, -1.0, 1.0)
    outs = []
    for start in range(0, len(images), batch_size):
      batch = images[start : start + batch_size]
      n = len(batch)
      if n < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
      outs.append(jax.tree.map(lambda a, n=n: np.asarray(a[:n]), apply(variables, batch)))
    if not outs:
      raise ValueError("no images given")
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  return feature_fn
