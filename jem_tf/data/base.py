"""What every data source shares: the known names, the preprocessing texts, ``ImageDataset`` and
``DataNotFoundError``."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

# Known names (for help texts and errors): any other tfds image classification name or a .npz path also works.
from jem_tf.choices import EVALUATION_ONLY_DATASETS, TFDS_DATASETS
from jem_tf.errors import UsageError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
MNIST_5K_FILE = "mnist_5k.csv.gz"
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX type codes (the third byte of the magic number) -> numpy big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# How raw pixels map to the [-1, 1] inputs the models take (recorded in exports).
PREPROCESSING = {
    "digits": "scikit-learn digits pixels {0..16} -> x / 8 - 1, shape [N, 8, 8, 1]",
    **{name: "uint8 pixels {0..255} -> x / 127.5 - 1" for name in TFDS_DATASETS + EVALUATION_ONLY_DATASETS},
}
# The mapping of 8-bit images (tfds data sets, image folders, IDX files, uint8 .npz files), part of their
# preprocessing text.
UINT8_PREPROCESSING = "uint8 pixels {0..255} -> x / 127.5 - 1"


def reads_uint8_pixels(preprocessing: str) -> bool:
    """Whether a data set's ``preprocessing`` text (:func:`jem_tf.data.preprocessing_of`) maps 8-bit pixels to
    ``[-1, 1]`` by ``x / 127.5 - 1``."""
    return isinstance(preprocessing, str) and UINT8_PREPROCESSING in preprocessing


class DataNotFoundError(UsageError):
    """Raised when a dataset is not on disk and downloading was not asked for."""


@dataclasses.dataclass
class ImageDataset:
    """Train and test images in [-1, 1] (float32 ``[N, H, W, C]``) with int32 labels; ``class_names``, when
    known (an image folder's sorted class folders), name the labels; ``preprocessing``, when set, says how the
    source's pixels became these images (else :func:`jem_tf.data.preprocessing_of` the name)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: Optional[Tuple[str, ...]] = None
    preprocessing: Optional[str] = None

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def scale_uint8(images: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels {0..255} to float32 in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
