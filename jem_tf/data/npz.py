"""Your own data as a ``.npz`` file: ``x_train, y_train, x_test, y_test``."""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Dict, Optional, Tuple

import numpy as np

from jem_tf.data.base import NPZ_KEYS, DataNotFoundError, ImageDataset, scale_uint8
from jem_tf.files import zip_member_is_forged


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
                info = archive.getinfo(f"{key}.npy")
                _check_zip_member_size(path, key, info, os.path.getsize(resolved))
                try:
                    with archive.open(info) as f:
                        version = np.lib.format.read_magic(f)
                        if version == (1, 0):
                            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                        elif version == (2, 0):
                            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                        else:  # format 3.0 (utf8 field names): numpy has no public reader of its header
                            shape, _, dtype = np.lib.format._read_array_header(f, version)
                        available = info.file_size - f.tell()
                except _NPZ_READ_ERRORS as error:
                    if "allow_pickle" in str(error):
                        raise ValueError(f"{path!r}: {key} is an object array, which needs pickle (never loaded: "
                                         "allow_pickle=False); store numeric arrays.") from error
                    raise _npz_corrupt(path, key, error) from error
                if dtype.hasobject:
                    raise ValueError(f"{path!r}: {key} is an object array (dtype {dtype}), which needs pickle (never "
                                     "loaded: allow_pickle=False); store numeric arrays, e.g. np.stack(images).")
                _check_declared_size(path, key, shape, dtype, available)
                headers[key] = (tuple(int(d) for d in shape), dtype)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
        raise _npz_corrupt(path, "", error) from error
    return headers


def _check_zip_member_size(path: str, key: str, info: zipfile.ZipInfo, file_bytes: int) -> None:
    """The sizes the zip directory gives member ``key`` must fit the file: stored bytes within it, and the
    uncompressed size what its compressed bytes can hold (a forged directory is refused before reading)."""
    if zip_member_is_forged(info, file_bytes):
        raise ValueError(f"{path!r} is truncated or corrupt (array {key!r}: its zip entry claims "
                         f"{info.file_size:,} bytes from {info.compress_size:,} stored bytes in a file of "
                         f"{file_bytes:,} bytes).")


def _check_declared_size(path: str, key: str, shape, dtype: np.dtype, available: int) -> None:
    """An array's ``.npy`` header must not claim more data than its zip entry holds: checked before anything is
    allocated (a forged header of 10^9 images would otherwise ask for gigabytes)."""
    declared = int(np.prod([int(d) for d in shape], dtype=object)) * int(dtype.itemsize)
    if declared > available:
        raise ValueError(f"{path!r} is truncated or corrupt (array {key!r}: its header declares shape "
                         f"{tuple(int(d) for d in shape)} of {dtype}, {declared:,} bytes, but the file holds "
                         f"{max(available, 0):,} bytes of it).")


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
