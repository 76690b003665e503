"""jem_tf.data.npz: your own .npz data sets, and every broken or forged file refused in one line."""

import io
import os
import zipfile

import numpy as np
import pytest
from conftest import TINY_TRAIN_ARGS, cli_error_line
from conftest import run_command as _cli

from jem_tf import data


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


def _forged_npz(path, claimed_images=10 ** 9):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (claimed_images, 8, 8)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x_train.npy", header.getvalue() + bytes(64 * 10))
        for key, array in (("y_train", np.zeros(10, np.int64)), ("x_test", np.zeros((4, 8, 8), np.uint8)),
                           ("y_test", np.array([0, 1, 0, 1]))):
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{key}.npy", buffer.getvalue())
    return str(path)


@pytest.mark.integration
def test_npz_headers_that_claim_more_than_the_file_holds_are_refused_before_allocating(tmp_path):
    from jem_tf.data import load_npz_dataset

    path = _forged_npz(tmp_path / "forged.npz")
    assert os.path.getsize(path) < 4096
    with pytest.raises(ValueError, match=r"forged.npz' is truncated or corrupt \(array 'x_train': its header declares "
                                         r"shape \(1000000000, 8, 8\) of uint8, 64,000,000,000 bytes, but the file "
                                         r"holds 640 bytes of it\)"):
        load_npz_dataset(path)
    result = _cli(*TINY_TRAIN_ARGS, "--dataset", path, "--workdir", str(tmp_path / "new"), timeout=120)
    assert result.returncode == 2 and "64,000,000,000 bytes, but the file holds 640" in cli_error_line(result)
    assert not (tmp_path / "new").exists()
    # A zip directory entry claiming more than its compressed bytes can hold is refused too.
    honest = tmp_path / "honest.npz"
    np.savez(honest, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.array([0, 1, 0, 1]),
             x_test=np.zeros((4, 8, 8), np.uint8), y_test=np.array([0, 1, 0, 1]))
    assert load_npz_dataset(str(honest)).x_train.shape == (4, 8, 8, 1)
