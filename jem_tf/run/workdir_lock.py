"""One training per work directory: :class:`WorkdirLock`, an ``flock`` on the run's ``.lock`` file that names its
holder, and :class:`WorkdirBusy`, the error when another live process holds it."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from typing import Optional

from jem_tf.errors import UsageError
from jem_tf.files import process_alive
from jem_tf.run.workdir import RunLayout


class WorkdirBusy(UsageError):
    """Another live process holds the work directory's lock."""


class WorkdirLock:
    """An exclusive lock on a work directory: ``layout.lock``, held with ``fcntl.flock`` for as long as the run
    lasts and holding the owner's pid, host and start time (to name it in errors).

    The kernel releases an ``flock`` when its process dies, however it dies, so a lock nobody holds is stale
    whatever it contains (empty or garbage: a crash between creating and writing it; another program's
    JSON) and is taken over, with a message. The take-over is atomic: two processes can never both hold the
    lock, as ``flock`` grants it to one. A lock file that names a live process of this host (a jem-tf older than
    the ``flock``) or any process of another host (where ``flock`` may not reach, e.g. some network file
    systems) is respected: delete the file by hand once that process is gone. Use as a context manager;
    :meth:`check` tells, writing nothing, whether :meth:`acquire` would fail.
    """

    def __init__(self, layout: RunLayout, *, log=print):
        self.path, self.log = layout.lock, log
        self.held = False
        self._fd = None

    def _owner(self, fd: int) -> Optional[dict]:
        """The lock file's owner record, or ``None`` when it is empty or not one (garbage)."""
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 4096)
            owner = json.loads(data.decode("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int) or not isinstance(
                owner.get("host"), str):
            return None
        return owner

    def _busy(self, owner: Optional[dict], why: str) -> WorkdirBusy:
        if owner is None:
            who = "another process (its lock file is still being written)"
        else:
            started = owner.get("started_unix")
            since = (f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))})"
                     if isinstance(started, (int, float)) else "")
            who = f"process {owner['pid']} on {owner['host']}{since}"
        return WorkdirBusy(f"{os.path.dirname(self.path)} is in use by {who}: one training per work directory. "
                           f"Wait for it to finish{why}.")

    def _judge(self, fd: int, locked_by_other: bool) -> Optional[dict]:
        """Raises :class:`WorkdirBusy` when the lock is held; else returns the stale owner record (or ``None``)."""
        owner = self._owner(fd)
        if locked_by_other:
            raise self._busy(owner, "")
        if owner is not None and owner["pid"] != os.getpid():
            if owner["host"] != socket.gethostname():
                raise self._busy(owner, f"; if that process is gone, delete {self.path} (a lock of another host "
                                        "cannot be checked from here)")
            if process_alive(owner["pid"]):
                raise self._busy(owner, f"; if that process is not a jem-tf training, delete {self.path}")
        return owner

    def _open(self, flags: int) -> int:
        """Opens the lock file without following a symbolic link (its target, anywhere, would be truncated and
        rewritten) and without blocking on a FIFO; anything but a regular file is refused."""
        try:
            fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except IsADirectoryError:
            raise WorkdirBusy(f"{self.path} is a directory, not a lock file; remove it.") from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise WorkdirBusy(f"{self.path} is a symbolic link, not a lock file; remove it (its target is "
                                  "never written).") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise WorkdirBusy(f"{self.path} is not a regular file, not a lock file; remove it.")
        return fd

    def check(self) -> None:
        """Raises :class:`WorkdirBusy` naming the holder when the lock is held; writes nothing."""
        try:
            fd = self._open(os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return  # no lock (or a work directory that prepare_workdir reports)
        try:
            self._judge(fd, not _try_flock(fd))
        finally:
            os.close(fd)  # closing drops a flock taken just to test

    def acquire(self) -> "WorkdirLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(10):
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                if not _try_flock(fd):
                    self._judge(fd, True)
                # A holder that released (and removed the file) between our open and flock: lock the new file.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                stale = self._judge(fd, False)
                if os.fstat(fd).st_size and self.log:
                    self.log("Taking over the stale lock of " + (
                        f"process {stale['pid']} (no longer running)." if stale else
                        f"{self.path} (empty or unreadable, and no process holds it)."))
                record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started_unix": int(time.time())}).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.held = fd, True
            return self
        raise WorkdirBusy(f"Could not lock {self.path}: it kept changing.")

    def release(self) -> None:
        if self.held:
            try:
                if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                    os.remove(self.path)  # while still holding the flock
            except FileNotFoundError:
                pass
            finally:
                os.close(self._fd)
                self._fd, self.held = None, False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _try_flock(fd: int) -> bool:
    """Whether an exclusive ``flock`` on ``fd`` was taken (without waiting)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True
