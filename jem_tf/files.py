"""Files written so that nothing is lost: a temporary name and a rename (a reader sees the whole file or the
previous one), a one-line :class:`DiskFullError` instead of a traceback when the disk fills up, temporaries
removed on any failure, and the clean-up of temporaries that killed processes left behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import zipfile
from typing import Callable, Optional

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "errno = 28")


class DiskFullError(RuntimeError):
    """A write failed because the file system is full: names the path; its temporary files are removed."""

    def __init__(self, path: str):
        super().__init__(f"cannot write {path}: the disk is full (no space left on device)")
        self.path = path


# The largest decompression ratio of deflate (about 1032:1): an entry claiming more is not a real zip member.
MAX_DEFLATE_RATIO = 1100


def zip_member_is_forged(info: zipfile.ZipInfo, file_bytes: int) -> bool:
    """Whether the sizes the zip directory gives a member cannot be true for a file of ``file_bytes``: stored bytes
    beyond the file, a stored member whose sizes differ, or more uncompressed bytes than deflate can produce."""
    return (info.compress_size > file_bytes
            or (info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size)
            or info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 1024)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from: Keras and h5py wrap ``OSError``) is a full disk."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError) or getattr(error, "errno", None) in DISK_FULL_ERRNOS or any(
                text in str(error) for text in _DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def remove_path(path: str) -> None:
    """Removes a file, link or directory tree at ``path`` if there is one (never following a link)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def check_free_space(directory: str, needed_bytes: int, path: str) -> None:
    """Raises :class:`DiskFullError` naming ``path`` when ``directory``'s file system has less than ``needed_bytes``
    free: checked before writers (h5py) that can crash the process on a full disk instead of raising."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < needed_bytes:
        raise DiskFullError(path)


def temporary_path(path: str, suffix: str = "") -> str:
    """The one name of every temporary file or directory jem-tf writes: ``DIR/.NAME.tmp-HOST-PID[SUFFIX]`` beside
    ``path`` (``DIR/NAME``); ``suffix`` for writers that read the format from the name (``.keras``, ``.png``,
    ``.npz``). :data:`TEMPORARY` matches them all, and :func:`remove_stale_temporaries` can tell whose process left
    one behind."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}{suffix}")


# The names temporary_path gives (groups: target, host, pid, suffix).
TEMPORARY = re.compile(r"^\.(?P<target>.+?)\.tmp-(?P<host>[^/]+?)-(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?$")


def write_atomically(path: str, write: Callable[[str], None], *, suffix: str = "", tmp: Optional[str] = None,
                     replace_directory: bool = False) -> None:
    """The one atomic write: calls ``write(tmp)``, which creates a file or a directory at ``tmp`` (default
    :func:`temporary_path` ``(path, suffix)``), and renames ``tmp`` to ``path``, so that ``path`` holds the previous
    content or the new one, never a part. Any writer fits (``model.save``, ``figure.savefig``,
    ``tf.saved_model.save``, ...); a ``tmp`` left by a killed process is removed first.

    On any failure (or an interrupt) the temporary file or directory is removed and ``path`` is left as it
    was; a full disk raises :class:`DiskFullError` naming ``path``. A directory cannot be renamed over a
    non-empty one: with ``replace_directory`` an existing directory at ``path`` is removed just before the
    rename (the one moment a reader finds neither); without it, renaming over one fails.

    Example:
        >>> write_atomically("model.keras", model.save, suffix=".keras")
    """
    tmp = tmp or temporary_path(path, suffix)
    try:
        remove_path(tmp)
        write(tmp)
        if replace_directory and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as error:
        remove_path(tmp)
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            raise DiskFullError(path) from error
        raise


def atomic_write_bytes(path: str, data: bytes, *, tmp: Optional[str] = None) -> None:
    """Writes ``data`` to ``path`` with :func:`write_atomically`, flushed to disk before the rename."""

    def write(tmp_path):
        with open(tmp_path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    write_atomically(path, write, tmp=tmp)


def atomic_write_json(path: str, values, *, tmp: Optional[str] = None) -> None:
    """Writes ``values`` as JSON (indented by 2) to ``path`` with :func:`atomic_write_bytes` (never a torn
    file)."""
    atomic_write_bytes(path, json.dumps(values, indent=2).encode("utf-8"), tmp=tmp)


def process_alive(pid) -> bool:
    """Whether process ``pid`` (an int > 0) runs on this host."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: str, *patterns: re.Pattern) -> list:
    """Removes the entries of ``directory`` whose name is a temporary one (:data:`TEMPORARY`, or one of
    ``patterns``: a group ``pid``, optionally ``host``) and that a process of this host which no longer runs left
    behind (a kill mid-write); returns their paths. Those of live processes and of other hosts are kept."""
    patterns = patterns or (TEMPORARY,)
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        match = next((m for m in (p.match(name) for p in patterns) if m), None)
        if match is None or match.groupdict().get("host") not in (None, socket.gethostname()):
            continue
        pid = int(match.group("pid"))
        if pid != os.getpid() and not process_alive(pid):
            remove_path(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
    return removed


def file_sha256(path: str, *, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file's contents, as hex (recorded for a converted run's source)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
