"""Input pipelines: embedded digits, TFDS, image folders, precomputed latents."""

from dit.data.digits import load_digits_arrays
from dit.data.pipeline import make_train_iterator

__all__ = ["load_digits_arrays", "make_train_iterator"]
