"""jem_tf.data.folders: image folders read as Keras reads them, decoded once and cached, hostile ones refused."""

import os

import numpy as np
import pytest
from conftest import HOSTILE, cache_files, make_folder, write_image
from conftest import hostile_folder as _hostile

from jem_tf.data import load_dataset, load_image_folder, load_image_folder_images, read_image_folder
from jem_tf.errors import UsageError


def test_class_order_counts_and_pixels_match_keras_image_dataset_from_directory(tmp_path, cache_dir):
    import keras

    root = make_folder(tmp_path / "data", per_class=(3, 2), size=(6, 5))
    data = load_image_folder(root, log=None)
    keras_train = keras.utils.image_dataset_from_directory(
        os.path.join(root, "train"), image_size=(6, 5), batch_size=None, shuffle=False, interpolation="nearest")
    assert data.class_names == tuple(keras_train.class_names) == ("Bee", "ant", "cat")
    assert data.num_classes == 3 and data.image_shape == (6, 5, 3)
    assert data.x_train.shape == (9, 6, 5, 3) and data.x_test.shape == (6, 6, 5, 3)
    keras_images = np.stack([x.numpy() for x, _ in keras_train])
    keras_labels = np.array([int(y) for _, y in keras_train])
    # PNG is lossless: the same pixels, scaled to [-1, 1], with the same labels (both sort files within a class).
    np.testing.assert_array_equal(data.y_train, keras_labels)
    np.testing.assert_allclose(data.x_train, keras_images / 127.5 - 1.0, atol=1e-6)
    assert data.x_train.dtype == np.float32 and data.x_train.min() >= -1.0 and data.x_train.max() <= 1.0


def test_jpeg_bmp_gif_and_nested_files_are_read_and_other_files_skipped(tmp_path, cache_dir):
    root = make_folder(tmp_path / "data", per_class=(2, 1))
    rgb = np.full((8, 8, 3), 128, np.uint8)
    write_image(os.path.join(root, "train", "ant", "a.jpg"), rgb, "JPEG")
    write_image(os.path.join(root, "train", "ant", "b.BMP"), rgb, "BMP")
    write_image(os.path.join(root, "train", "ant", "sub", "c.gif"), rgb, "GIF")
    open(os.path.join(root, "train", "ant", "notes.txt"), "w").write("not an image")
    open(os.path.join(root, "train", "ant", ".DS_Store"), "w").write("x")
    lines = []
    arrays, info = read_image_folder(root, log=lines.append)
    assert info.counts == {"train": 9, "test": 3} and info.skipped == 2
    assert np.sum(arrays["train"][1] == 1) == 5  # ant: 2 generated + jpg + bmp + nested gif
    assert "2 non-image or hidden file(s) skipped" in lines[0]


def test_grayscale_mixed_and_rgba_folders_are_handled_explicitly(tmp_path, cache_dir):
    gray = load_image_folder(make_folder(tmp_path / "gray", channels=1), log=None)
    assert gray.image_shape == (8, 8, 1)
    mixed = make_folder(tmp_path / "mixed", channels=1)
    write_image(os.path.join(mixed, "train", "ant", "colour.png"), np.full((8, 8, 3), 200, np.uint8))
    data = load_image_folder(mixed, log=None)
    assert data.image_shape == (8, 8, 3) and "grayscale images repeated over 3 channels" in data.preprocessing
    rgba = make_folder(tmp_path / "rgba")
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[..., 0], pixels[..., 3] = 255, 7
    write_image(os.path.join(rgba, "test", "cat", "alpha.png"), pixels)
    data = load_image_folder(rgba, log=None)
    assert data.image_shape == (8, 8, 3) and "alpha channel dropped" in data.preprocessing
    alpha_row = np.flatnonzero((data.x_test[..., 0] == 1.0).all(axis=(1, 2)) & (data.x_test[..., 1] == -1.0).all(
        axis=(1, 2)))
    assert len(alpha_row) == 1  # the red pixels kept, the alpha gone


def test_sizes_must_agree_unless_image_size_resizes(tmp_path, cache_dir):
    root = make_folder(tmp_path / "data")
    odd = os.path.join(root, "train", "cat", "big.png")
    write_image(odd, np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(UsageError, match=r"big.png' is 12x10 pixels but .* is 8x8: every image must have one size"):
        load_image_folder(root, log=None)
    assert cache_files(cache_dir) == []
    data = load_image_folder(root, image_size=(6, 7), resize_method="nearest", log=None)
    assert data.image_shape == (6, 7, 3) and "Pillow nearest to 6x7" in data.preprocessing
    with pytest.raises(UsageError, match="image_size must be"):
        load_image_folder(root, image_size=(6,), log=None)
    with pytest.raises(UsageError, match="resize_method must be one of"):
        load_image_folder(root, image_size=(6, 6), resize_method="magic", log=None)


def test_the_cache_is_used_and_invalidated_when_a_file_changes(tmp_path, cache_dir):
    root = make_folder(tmp_path / "data")
    first, info = read_image_folder(root, log=None)
    assert not info.from_cache and len(cache_files(cache_dir)) == 1
    again, info = read_image_folder(root, log=None)
    assert info.from_cache
    np.testing.assert_array_equal(first["train"][0], again["train"][0])
    path = os.path.join(root, "train", "ant", "000.png")
    write_image(path, np.full((8, 8, 3), 255, np.uint8))
    os.utime(path, ns=(1, 1))  # a new modification time (and size): the cache key changes
    changed, info = read_image_folder(root, log=None)
    assert not info.from_cache and changed["train"][0].max() == 255
    os.remove(os.path.join(root, "train", "cat", "000.png"))
    _, info = read_image_folder(root, log=None)
    assert not info.from_cache and info.counts["train"] == 11
    _, info = read_image_folder(root, use_cache=False, log=None)
    assert not info.from_cache and info.cache_file is None


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_folders_get_one_line_naming_the_path_and_nothing_is_cached(tmp_path, cache_dir, kind):
    root, message = _hostile(tmp_path, kind)
    with pytest.raises(UsageError, match=message) as error:
        load_dataset(root, log=None)
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)
    assert cache_files(cache_dir) == []


def test_a_folder_of_very_many_tiny_files_is_refused_before_decoding(tmp_path, cache_dir):
    # The bound is the decoded arrays' memory: with max_bytes small, a folder of a few hundred 1x1 files stands in
    # for 10^6 of them (the listing stops at the bound; nothing is decoded or cached).
    root = make_folder(tmp_path / "many", per_class=(100, 1), size=(1, 1))
    with pytest.raises(UsageError, match=r"holds more than 20 image files"):
        read_image_folder(root, max_bytes=300, log=None)
    larger = make_folder(tmp_path / "larger", per_class=(5, 1), size=(8, 8))  # 18 images of 192 bytes
    with pytest.raises(UsageError, match=r"15 images of 8x8 need 0.0 GiB, more than the bound"):
        read_image_folder(larger, max_bytes=5000, log=None)
    assert cache_files(cache_dir) == []


def test_ood_folders_with_or_without_class_subfolders(tmp_path, cache_dir):
    root = make_folder(tmp_path / "data")
    assert load_image_folder_images(root, log=None).x_test.shape == (6, 8, 8, 3)  # its test/ split
    flat = tmp_path / "flat"
    for i in range(3):
        write_image(str(flat / f"{i}.png"), np.zeros((10, 10, 3), np.uint8))
    images = load_image_folder_images(str(flat), image_size=(8, 8), log=None)
    assert images.x_test.shape == (3, 8, 8, 3) and len(images.x_train) == 0
    classes = load_image_folder_images(os.path.join(root, "train"), log=None)
    assert classes.x_test.shape == (12, 8, 8, 3) and classes.class_names == ("Bee", "ant", "cat")
