"""The files of an image folder: listing them safely (sorted, links followed, loops refused, bounded) and
decoding them with Pillow into one uint8 array (channels and sizes checked). :mod:`jem_tf.data.folders` builds
datasets and the cache on these."""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

from jem_tf.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

SPLITS = ("train", "test")
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "MPO")  # MPO: a JPEG with extra frames (some cameras)


# ----------------------------------------------------------------------------------------------------------- listing
def walk_images(root: str, *, max_files: int) -> Tuple[List[str], int]:
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


def class_folders(split_dir: str) -> List[str]:
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
    classes = class_folders(os.path.join(root, splits[0]))
    if len(classes) < 2:
        raise UsageError(f"{os.path.join(path, splits[0])!r} holds {len(classes)} class folder(s) "
                         f"({', '.join(classes) or 'none'}); a classifier needs at least 2.")
    files, skipped = {}, 0
    for split in splits:
        split_classes = class_folders(os.path.join(root, split))
        unknown = sorted(set(split_classes) - set(classes))
        if unknown:
            raise UsageError(f"{os.path.join(path, split, unknown[0])!r} is a class that {splits[0]}/ does not have "
                             f"(classes: {', '.join(classes)}).")
        files[split] = []
        for label, name in enumerate(classes):
            class_dir = os.path.join(root, split, name)
            if not os.path.isdir(class_dir):
                continue  # a class without test images
            found, skipped_here = walk_images(class_dir, max_files=max_files)
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


def decode_images(files: List[Tuple[str, int]], *, image_size, resize_method, label: str, max_bytes: int, progress: bool
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
