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
import errno
import hashlib
import json
import os
import stat
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from jem_tf.data.base import ImageDataset, scale_uint8
from jem_tf.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "lanczos", "box", "area")
SPLITS = ("train", "test")
CACHE_FORMAT = 1  # bumped when the cache file's layout or the decoding changes
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "MPO")  # MPO: a JPEG with extra frames (some cameras)


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


# ----------------------------------------------------------------------------------------------------------- listing
def _walk_images(root: str, *, max_files: int) -> Tuple[List[str], int]:
    """``(image files, skipped count)`` under ``root``, sorted, following links but refusing a link that loops.

    At most ``max_files`` entries are kept: more is a one-line error (memory stays bounded)."""
    files, skipped = [], 0
    stack = [(root, ())]
    while stack:
        directory, ancestors = stack.pop()
        try:
            info = os.stat(directory)
        except OSError as error:
            raise _os_error(directory, error) from error
        identity = (info.st_dev, info.st_ino)
        if identity in ancestors:
            link = directory
            while link != root and not os.path.islink(link):
                link = os.path.dirname(link)
            raise UsageError(f"{link!r} is a symbolic link loop (it leads back to a folder above it); remove it.")
        try:
            with os.scandir(directory) as entries:
                names = sorted((entry.name, entry.path) for entry in entries)
        except OSError as error:
            raise _os_error(directory, error) from error
        subdirectories = []
        for name, path in names:
            if name.startswith("."):
                skipped += 1
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError as error:
                raise _os_error(path, error) from error
            if stat.S_ISDIR(mode):
                subdirectories.append(path)
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                if not stat.S_ISREG(mode):
                    raise UsageError(f"{path!r} is not a regular file (a device, FIFO or socket); remove it.")
                files.append(path)
                if len(files) > max_files:
                    raise UsageError(
                        f"{root!r} holds more than {max_files:,} image files, more than this machine's memory bound "
                        "allows for the decoded images; use a smaller folder (or pass a larger max_bytes).")
            else:
                skipped += 1
        stack.extend((path, ancestors + (identity,)) for path in reversed(subdirectories))
    return sorted(files), skipped


def _os_error(path: str, error: OSError) -> UsageError:
    if error.errno == errno.ELOOP:
        return UsageError(f"{path!r} is a symbolic link loop; remove it.")
    if error.errno == errno.ENOENT and os.path.islink(path):
        return UsageError(f"{path!r} is a broken symbolic link; remove it.")
    return UsageError(f"{path!r} cannot be read: {error.strerror or error}.")


def _class_folders(split_dir: str) -> List[str]:
    try:
        with os.scandir(split_dir) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e.path))
    except OSError as error:
        raise _os_error(split_dir, error) from error


def _is_dir(path: str) -> bool:
    try:
        return os.path.isdir(path)
    except OSError:
        return False


def list_image_folder(path: str, *, splits: Sequence[str] = SPLITS, max_files: int = 10**7
                      ) -> Tuple[List[str], Dict[str, List[Tuple[str, int]]], int]:
    """``(class_names, {split: [(file, label), ...]}, skipped)`` of the image folder ``path``.

    Raises:
        UsageError: a missing ``train/`` or ``test/`` folder, fewer than 2 classes, an empty class folder, a test
            class missing from ``train/``, a symbolic link loop, or more than ``max_files`` files.
    """
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise UsageError(f"{path!r} is not a directory.")
    for split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise UsageError(f"{os.path.join(path, split)!r} does not exist: an image folder holds train/<class>/ and "
                             "test/<class>/ folders of images.")
    classes = _class_folders(os.path.join(root, splits[0]))
    if len(classes) < 2:
        raise UsageError(f"{os.path.join(path, splits[0])!r} holds {len(classes)} class folder(s) "
                         f"({', '.join(classes) or 'none'}); a classifier needs at least 2.")
    files, skipped = {}, 0
    for split in splits:
        split_classes = _class_folders(os.path.join(root, split))
        unknown = sorted(set(split_classes) - set(classes))
        if unknown:
            raise UsageError(f"{os.path.join(path, split, unknown[0])!r} is a class that {splits[0]}/ does not have "
                             f"(classes: {', '.join(classes)}).")
        files[split] = []
        for label, name in enumerate(classes):
            class_dir = os.path.join(root, split, name)
            if not os.path.isdir(class_dir):
                continue  # a class without test images
            found, skipped_here = _walk_images(class_dir, max_files=max_files)
            skipped += skipped_here
            if not found:
                raise UsageError(f"{class_dir!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); remove the "
                                 "folder or add images.")
            files[split].extend((f, label) for f in found)
            if sum(len(v) for v in files.values()) > max_files:
                raise UsageError(f"{path!r} holds more than {max_files:,} image files, more than this machine's "
                                 "memory bound allows for the decoded images; use a smaller folder.")
    return classes, files, skipped


# ---------------------------------------------------------------------------------------------------------- decoding
class _Decoder:
    """Decodes one file into a uint8 ``[H, W, C]`` array, recording the conversions it made."""

    def __init__(self, *, image_size, resize_method, channels):
        from PIL import Image

        self.image = Image
        self.image_size = image_size
        self.resample = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
                         "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                         "box": Image.Resampling.BOX, "area": Image.Resampling.BOX}[resize_method]
        self.channels = channels
        self.conversions = set()

    def mode_channels(self, path: str) -> int:
        """1 for a grayscale file, 3 for a colour one (the header only)."""
        with self._open(path) as img:
            return 1 if img.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") or (
                img.mode in ("P", "PA") and _gray_palette(img)) else 3

    def _open(self, path):
        try:
            img = self.image.open(path)
        except (OSError, SyntaxError, ValueError) as error:
            raise UsageError(f"{path!r} is not a readable image ({_reason(error)}); remove or replace it.") from error
        if img.format not in _PIL_FORMATS:
            img.close()
            raise UsageError(f"{path!r} is a {img.format} image; image folders take JPEG, PNG, BMP or GIF files.")
        return img

    def __call__(self, path: str) -> np.ndarray:
        with self._open(path) as img:
            try:
                img.load()  # decodes everything: a truncated or corrupt file fails here
                img = self._to_mode(img)
                if self.image_size is not None and img.size != (self.image_size[1], self.image_size[0]):
                    img = img.resize((self.image_size[1], self.image_size[0]), self.resample)
                array = np.asarray(img)
            except (OSError, SyntaxError, ValueError) as error:
                raise UsageError(f"{path!r} is truncated or corrupt ({_reason(error)}); remove or replace it."
                                 ) from error
        if array.dtype != np.uint8:
            raise UsageError(f"{path!r} has pixels of type {array.dtype}, which cannot be read as 8-bit images.")
        return array.reshape(array.shape[0], array.shape[1], -1)

    def _to_mode(self, img):
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            self.conversions.add("16-bit grayscale scaled to 8 bits")
            array = np.asarray(img, dtype=np.float64) / 257.0
            img = self.image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
            mode = "L"
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            self.conversions.add("alpha channel dropped (RGBA -> RGB, LA -> L)")
        if mode == "CMYK":
            self.conversions.add("CMYK converted to RGB")
        if self.channels == 1:
            return img if mode == "L" else img.convert("L")
        if mode in ("1", "L", "LA", "I", "F") or (mode in ("P", "PA") and _gray_palette(img)):
            self.conversions.add("grayscale images repeated over 3 channels (the folder mixes grayscale and colour)")
        return img if mode == "RGB" else img.convert("RGB")


def _gray_palette(img) -> bool:
    palette = img.getpalette() or []
    triples = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
    return bool(len(triples)) and bool(np.all(triples == triples[:, :1]))


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Progress:
    """A one-line progress bar on a terminal (``stderr``), or nothing; ``log`` gets the summary."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.start, self.last = total, label, time.time(), 0.0
        self.enabled = enabled and total > 0 and sys.stderr.isatty()

    def update(self, done: int) -> None:
        now = time.time()
        if not self.enabled or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        width = 30
        filled = int(width * done / self.total)
        rate = done / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'=' * filled}{'.' * (width - filled)}] {done:,}/{self.total:,} "
                         f"{rate:,.0f} files/s")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _decode(files: List[Tuple[str, int]], *, image_size, resize_method, label: str, max_bytes: int, progress: bool
            ) -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    """Decodes ``files`` into ``(uint8 [N, H, W, C], int32 [N], conversions)``, checking sizes."""
    if not files:
        raise UsageError(f"{label} holds no image files.")
    probe = _Decoder(image_size=image_size, resize_method=resize_method, channels=None)
    channels = 1
    for path, _ in files:  # headers only (fast): any colour image makes the folder RGB
        if probe.mode_channels(path) == 3:
            channels = 3
            break
    decoder = _Decoder(image_size=image_size, resize_method=resize_method, channels=channels)
    first = decoder(files[0][0])
    shape = first.shape
    # The uint8 arrays plus their float32 copy (ImageDataset) must fit.
    needed = len(files) * int(np.prod(shape)) * 5
    if needed > max_bytes:
        raise UsageError(f"{label}: {len(files):,} images of {shape[1]}x{shape[0]} need {needed / 2**30:.1f} GiB, more "
                         f"than the bound of {max_bytes / 2**30:.1f} GiB; use fewer or smaller images (--image-size).")
    images = np.empty((len(files),) + shape, np.uint8)
    labels = np.empty(len(files), np.int32)
    bar = _Progress(len(files), f"decoding {label}", progress)
    for i, (path, class_index) in enumerate(files):
        array = first if i == 0 else decoder(path)
        if array.shape != shape:
            raise UsageError(f"{path!r} is {array.shape[1]}x{array.shape[0]} pixels but {files[0][0]!r} is "
                             f"{shape[1]}x{shape[0]}: every image must have one size, or pass --image-size H W "
                             "(image_size=(H, W)) to resize them.")
        images[i], labels[i] = array, class_index
        if i % 256 == 0 or i + 1 == len(files):
            bar.update(i + 1)
    return images, labels, tuple(sorted(decoder.conversions))


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
        tmp = f"{cache_file}.tmp{os.getpid()}.npz"
        payload = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        for split, (x, y) in arrays.items():
            payload[f"x_{split}"], payload[f"y_{split}"] = x, y
        np.savez(tmp, **payload)
        os.replace(tmp, cache_file)
    except OSError as error:
        print(f"warning: the decoded images could not be cached in {cache_file!r} ({error.strerror or error}); the "
              "next run decodes them again.", file=sys.stderr)
        try:
            os.remove(tmp)
        except (OSError, UnboundLocalError):
            pass


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
        x, y, made = _decode(files[split], image_size=image_size, resize_method=resize_method,
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
        files, _ = _walk_images(root, max_files=max(1, max_bytes // 15))
        if not files:
            raise UsageError(f"{path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
        subfolders = _class_folders(root)
        classes = tuple(subfolders) if subfolders else ()

        def label_of(file):
            top = os.path.relpath(file, root).split(os.sep)[0]
            return classes.index(top) if top in classes else 0

        x, y, _ = _decode([(f, label_of(f)) for f in files], image_size=image_size, resize_method=resize_method,
                          label=path, max_bytes=max_bytes, progress=progress)
        if log is not None:
            log(f"{root}: {len(files):,} images of {'x'.join(map(str, x.shape[1:]))} decoded")
    empty = np.zeros((0,) + x.shape[1:], np.float32)
    return ImageDataset(os.path.basename(root.rstrip(os.sep)) or root, empty, np.zeros(0, np.int32), scale_uint8(x), y,
                        num_classes=max(len(classes), int(y.max()) + 1 if len(y) else 1), class_names=tuple(classes))
