"""Image folders: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (the layout of
``keras.utils.image_dataset_from_directory``), decoded once into a cache.

* **Classes** are the sorted names of the ``train/`` subfolders, as Keras orders them; ``test/`` must not hold a
  class that ``train/`` lacks. Files in a class folder's subfolders count for that class (as in Keras).
* **Files**: JPEG, PNG, BMP and GIF (the extensions Keras reads: ``.jpg .jpeg .png .bmp .gif``, any case), decoded
  with Pillow; a GIF gives its first frame. Hidden files and files with other extensions are skipped, and their
  count is logged. A file named as an image that Pillow cannot decode, or that is truncated, is an error naming it.
* **Channels**: grayscale images give 1 channel, colour ones 3. A folder that mixes them is read as RGB (grayscale
  images repeated over the 3 channels). RGBA and grayscale-with-alpha images are converted by dropping the alpha
  channel (Keras's ``color_mode="rgb"`` does the same); palette images are expanded; 16-bit images are scaled to 8
  bits. The conversions made are listed in :attr:`FolderInfo.conversions` and the preprocessing text.
* **Size**: every image must have the first image's size, or an error names a file and its size; with
  ``image_size=(H, W)`` every image is resized (Pillow, ``resize_method``) and the method is recorded.
* **Cache**: decoded uint8 arrays are written to ``cache_dir`` (default ``$XDG_CACHE_HOME/jem_tf/image_folders``,
  else ``~/.cache/jem_tf/image_folders``) under a key made of every file's relative path, size and modification
  time plus the reading options, so a rerun, a resume, ``evaluate`` and ``export`` read the arrays instead of
  decoding every file again, and a changed, added or removed file decodes the folder anew. Nothing is written for a
  folder that fails.
* **Memory** is bounded before anything is decoded: the arrays of the listed files must fit in ``max_bytes``
  (default: half of the machine's memory); a folder of millions of files is refused in one line, not read.

Every problem is a :class:`~jem_tf.errors.UsageError` of one line that names the path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from jem_tf.choices import RESIZE_METHODS
from jem_tf.data.base import ImageDataset, scale_uint8
from jem_tf.data.image_files import (
    IMAGE_EXTENSIONS,
    SPLITS,
    class_folders,
    decode_images,
    list_image_folder,
    walk_images,
)
from jem_tf.errors import UsageError
from jem_tf.files import DiskFullError, write_atomically

CACHE_FORMAT = 1  # bumped when the cache file's layout or the decoding changes


@dataclasses.dataclass(frozen=True)
class FolderInfo:
    """What reading an image folder found and did (recorded in ``config.json``, ``metrics.json`` and exports)."""

    path: str
    class_names: Tuple[str, ...]
    image_shape: Tuple[int, int, int]
    counts: Dict[str, int]
    conversions: Tuple[str, ...] = ()
    resize: Optional[str] = None
    skipped: int = 0
    cache_file: Optional[str] = None
    from_cache: bool = False
    seconds: float = 0.0

    @property
    def preprocessing(self) -> str:
        """How the files map to the model's inputs, in words."""
        shape = ", ".join(map(str, self.image_shape))
        parts = [f"image files (JPEG/PNG/BMP/GIF, decoded by Pillow) -> uint8 [N, {shape}]"]
        if self.resize:
            parts.append(f"resized with {self.resize}")
        parts.extend(self.conversions)
        parts.append("x / 127.5 - 1")
        return "; ".join(parts)


def is_image_folder_name(name) -> bool:
    """Whether the dataset name ``name`` is a directory (``~`` expanded; relative to the current directory)."""
    return isinstance(name, str) and bool(name.strip()) and os.path.isdir(os.path.expanduser(name))


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/jem_tf/image_folders``, else ``~/.cache/jem_tf/image_folders``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jem_tf", "image_folders")


def default_max_bytes() -> int:
    """Half of the machine's physical memory (the bound on a folder's decoded arrays, float32 copy included)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


# ------------------------------------------------------------------------------------------------------------- cache
def _cache_key(files: Dict[str, List[Tuple[str, int]]], root: str, classes, *, image_size, resize_method) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "root": root, "classes": list(classes),
                              "image_size": None if image_size is None else list(image_size),
                              "resize_method": resize_method if image_size is not None else None}).encode())
    for split in sorted(files):
        for path, label in files[split]:
            info = os.stat(path)
            digest.update(f"{split}\0{os.path.relpath(path, root)}\0{label}\0{info.st_size}\0{info.st_mtime_ns}\n"
                          .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _read_cache(cache_file: str, splits: Sequence[str]):
    try:
        with np.load(cache_file, allow_pickle=False) as stored:
            meta = json.loads(bytes(stored["meta"]).decode())
            arrays = {split: (stored[f"x_{split}"], stored[f"y_{split}"]) for split in splits}
        return arrays, meta
    except (OSError, ValueError, KeyError, EOFError):
        return None  # unreadable (e.g. a half-written file of another version): decode again


def _write_cache(cache_file: str, arrays, meta: dict) -> None:
    """Atomic: a temporary file in the same folder, renamed. A cache that cannot be written is only a warning."""
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        payload = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        for split, (x, y) in arrays.items():
            payload[f"x_{split}"], payload[f"y_{split}"] = x, y
        write_atomically(cache_file, lambda tmp: np.savez(tmp, **payload), suffix=".npz")  # savez adds no .npz then
    except (OSError, DiskFullError) as error:
        # (write_atomically removed its temporary file.)
        print(f"warning: the decoded images could not be cached in {cache_file!r} "
              f"({getattr(error, 'strerror', None) or error}); the next run decodes them again.", file=sys.stderr)


# -------------------------------------------------------------------------------------------------------------- API
def _check_options(image_size, resize_method):
    if image_size is not None:
        size = tuple(image_size) if isinstance(image_size, (list, tuple)) else None
        if size is None or len(size) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in size):
            raise UsageError(f"image_size must be (height, width), two ints >= 1; received {image_size!r}")
        image_size = size
    if resize_method not in RESIZE_METHODS:
        raise UsageError(f"resize_method must be one of {', '.join(RESIZE_METHODS)}; received {resize_method!r}")
    return image_size


def read_image_folder(path: str, *, splits: Sequence[str] = SPLITS, image_size: Optional[Sequence[int]] = None,
                      resize_method: str = "bilinear", cache_dir: Optional[str] = None, use_cache: bool = True,
                      max_bytes: Optional[int] = None, progress: bool = True, log=print):
    """``({split: (uint8 images, int32 labels)}, FolderInfo)`` of the image folder ``path`` (see the module
    docstring). ``log``: where the one-line summary goes (``None``: nowhere)."""
    start = time.time()
    image_size = _check_options(image_size, resize_method)
    max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
    root = os.path.abspath(os.path.expanduser(path))
    # One file of 1x1 RGB pixels needs 5 * 3 bytes at least: a bound on the listing as well.
    classes, files, skipped = list_image_folder(path, splits=splits, max_files=max(1, max_bytes // 15))
    cache_file = None
    if use_cache:
        key = _cache_key(files, root, classes, image_size=image_size, resize_method=resize_method)
        cache_file = os.path.join(cache_dir or default_cache_dir(), f"{key}.npz")
        cached = _read_cache(cache_file, splits) if os.path.isfile(cache_file) else None
        if cached is not None:
            arrays, meta = cached
            info = FolderInfo(path=root, class_names=tuple(classes), image_shape=tuple(meta["image_shape"]),
                              counts={s: int(len(arrays[s][1])) for s in splits},
                              conversions=tuple(meta["conversions"]), resize=meta["resize"], skipped=skipped,
                              cache_file=cache_file, from_cache=True, seconds=time.time() - start)
            _log_summary(log, info)
            return arrays, info
    arrays, conversions, shape = {}, set(), None
    channels_seen = set()
    for split in splits:
        x, y, made = decode_images(files[split], image_size=image_size, resize_method=resize_method,
                             label=os.path.join(path, split), max_bytes=max_bytes, progress=progress)
        if shape is not None and x.shape[1:3] != shape[:2]:
            raise UsageError(f"{files[split][0][0]!r} is {x.shape[2]}x{x.shape[1]} pixels but the {splits[0]} images "
                             f"are {shape[1]}x{shape[0]}: every image must have one size, or pass --image-size H W.")
        shape = x.shape[1:]
        channels_seen.add(x.shape[-1])
        arrays[split] = (x, y)
        conversions.update(made)
    if len(channels_seen) > 1:  # one split grayscale, the other colour: make both RGB
        conversions.add("grayscale images repeated over 3 channels (the folder mixes grayscale and colour)")
        arrays = {s: (np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x, y) for s, (x, y) in arrays.items()}
        shape = shape[:2] + (3,)
    resize = None if image_size is None else f"Pillow {resize_method} to {image_size[0]}x{image_size[1]} (HxW)"
    info = FolderInfo(path=root, class_names=tuple(classes), image_shape=tuple(int(d) for d in shape),
                      counts={s: int(len(arrays[s][1])) for s in splits}, conversions=tuple(sorted(conversions)),
                      resize=resize, skipped=skipped, cache_file=cache_file, seconds=time.time() - start)
    if use_cache:
        _write_cache(cache_file, arrays, {"image_shape": list(info.image_shape), "conversions": list(info.conversions),
                                          "resize": resize, "classes": classes})
    _log_summary(log, info)
    return arrays, info


def _log_summary(log, info: FolderInfo) -> None:
    if log is None:
        return
    counts = ", ".join(f"{n:,} {s}" for s, n in info.counts.items())
    source = "from the cache" if info.from_cache else "decoded"
    extra = [f"{info.skipped} non-image or hidden file(s) skipped"] if info.skipped else []
    extra += list(info.conversions) + ([f"resized: {info.resize}"] if info.resize else [])
    log(f"{info.path}: {len(info.class_names)} classes, {counts} images of "
        f"{'x'.join(map(str, info.image_shape))} {source} in {info.seconds:.1f} s"
        + (f" ({'; '.join(extra)})" if extra else ""))


def load_image_folder(path: str, *, image_size: Optional[Sequence[int]] = None, resize_method: str = "bilinear",
                      cache_dir: Optional[str] = None, use_cache: bool = True, max_bytes: Optional[int] = None,
                      progress: bool = True, log=print) -> ImageDataset:
    """Loads the image folder ``path`` (``train/<class>/`` and ``test/<class>/``) as an :class:`ImageDataset` with
    images in [-1, 1], integer labels in the sorted order of the class folders, and ``class_names``.

    Args:
        path: The folder.
        image_size: ``(height, width)`` to resize every image to; default: every image must have one size.
        resize_method: Pillow resampling used with ``image_size``: bilinear (default), nearest, bicubic, lanczos,
            box (= area).
        cache_dir: Where the decoded arrays are cached (default :func:`default_cache_dir`).
        use_cache: Read and write the cache. Default True.
        max_bytes: Bound on the decoded arrays' memory (default: half of the machine's memory).
        progress: A progress bar on a terminal while decoding. Default True.
        log: Receives a one-line summary (``None``: silent).

    Raises:
        UsageError: one line naming the path: a missing split folder, an empty class folder, a test class that
            train/ lacks, a single class, a file that is not an image, a corrupt or truncated image, images of
            different sizes, a symbolic link loop, or more images than ``max_bytes`` allows.

    Example:
        >>> data = load_image_folder("cifar10_images")          # train/airplane/0001.jpg, ...
        >>> data.class_names[:2], data.image_shape
        (('airplane', 'automobile'), (32, 32, 3))
    """
    arrays, info = read_image_folder(path, image_size=image_size, resize_method=resize_method, cache_dir=cache_dir,
                                     use_cache=use_cache, max_bytes=max_bytes, progress=progress, log=log)
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    return ImageDataset(os.path.basename(info.path.rstrip(os.sep)) or info.path, scale_uint8(x_train), y_train,
                        scale_uint8(x_test), y_test, num_classes=len(info.class_names),
                        class_names=info.class_names, preprocessing=info.preprocessing)


def load_image_folder_images(path: str, *, image_size: Optional[Sequence[int]] = None,
                             resize_method: str = "bilinear", cache_dir: Optional[str] = None, use_cache: bool = True,
                             max_bytes: Optional[int] = None, progress: bool = True, log=print) -> ImageDataset:
    """An evaluation set (e.g. out-of-distribution images) from a folder in any of three layouts: an image folder
    (its ``test/`` split), class subfolders of images (all of them), or images directly in ``path``. The train split
    of the result is empty; its labels are the class folders' indices (0 for images without classes)."""
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise UsageError(f"{path!r} is not a directory.")
    if os.path.isdir(os.path.join(root, "test")):
        arrays, info = read_image_folder(path, splits=("test",), image_size=image_size, resize_method=resize_method,
                                         cache_dir=cache_dir, use_cache=use_cache, max_bytes=max_bytes,
                                         progress=progress, log=log)
        x, y = arrays["test"]
        classes = info.class_names
    else:
        image_size = _check_options(image_size, resize_method)
        max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        files, _ = walk_images(root, max_files=max(1, max_bytes // 15))
        if not files:
            raise UsageError(f"{path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
        subfolders = class_folders(root)
        classes = tuple(subfolders) if subfolders else ()

        def label_of(file):
            top = os.path.relpath(file, root).split(os.sep)[0]
            return classes.index(top) if top in classes else 0

        x, y, _ = decode_images([(f, label_of(f)) for f in files], image_size=image_size, resize_method=resize_method,
                          label=path, max_bytes=max_bytes, progress=progress)
        if log is not None:
            log(f"{root}: {len(files):,} images of {'x'.join(map(str, x.shape[1:]))} decoded")
    empty = np.zeros((0,) + x.shape[1:], np.float32)
    return ImageDataset(os.path.basename(root.rstrip(os.sep)) or root, empty, np.zeros(0, np.int32), scale_uint8(x), y,
                        num_classes=max(len(classes), int(y.max()) + 1 if len(y) else 1), class_names=tuple(classes))
