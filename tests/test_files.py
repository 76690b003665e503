"""jem_tf.files: atomic writes: the old content or the new, never a part, no temporary left."""

import errno
import json
import os
import socket

import pytest
from conftest import fill as _fill
from conftest import mount_tmpfs as _mount_tmpfs
from conftest import umount as _umount

from jem_tf.files import (
    TEMPORARY,
    DiskFullError,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temporaries,
    temporary_path,
    write_atomically,
)


def test_bytes_and_json_replace_the_whole_file(tmp_path):
    path = str(tmp_path / "a.bin")
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new content")
    assert open(path, "rb").read() == b"new content"
    target = str(tmp_path / "report.json")
    values = {"auroc": 0.5, "name": "Fréchet", "list": [1, 2]}
    atomic_write_json(target, values)
    # The bytes json.dump(values, f, indent=2) writes.
    assert open(target).read() == json.dumps(values, indent=2) and json.load(open(target)) == values
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "report.json"]


def test_a_failing_writer_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "model.keras")
    atomic_write_bytes(path, b"complete")
    seen = []

    def half_write(tmp):
        seen.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"part")
        assert open(path, "rb").read() == b"complete"  # the target is untouched while the writer runs
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_atomically(path, half_write)
    assert seen == [os.path.join(str(tmp_path), f".model.keras.tmp-{socket.gethostname()}-{os.getpid()}")]
    assert TEMPORARY.match(os.path.basename(seen[0])).group("target") == "model.keras"
    assert open(path, "rb").read() == b"complete" and os.listdir(tmp_path) == ["model.keras"]

    def interrupted(tmp):
        open(tmp, "wb").close()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupt too
        write_atomically(path, interrupted)
    assert os.listdir(tmp_path) == ["model.keras"]


def test_a_full_disk_is_one_error_naming_the_target(tmp_path):
    path = str(tmp_path / "config.json")

    def full(tmp):
        open(tmp, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"cannot write {path}: the disk is full"):
        write_atomically(path, full)
    assert os.listdir(tmp_path) == []

    def refused(tmp):  # a free-space check before the write
        raise DiskFullError("elsewhere")

    with pytest.raises(DiskFullError, match="cannot write elsewhere"):  # passed on as it is
        write_atomically(path, refused)


def test_a_stale_temporary_is_replaced_and_a_custom_name_is_used(tmp_path):
    path, tmp = str(tmp_path / "samples.png"), str(tmp_path / "samples.png.tmp")
    with open(tmp, "wb") as f:
        f.write(b"left by a killed process, longer than the new content")

    def write(name):
        assert name == tmp and not os.path.exists(name)
        with open(name, "wb") as f:
            f.write(b"png")

    write_atomically(path, write, tmp=tmp)
    assert open(path, "rb").read() == b"png" and os.listdir(tmp_path) == ["samples.png"]


def _write_directory(content):
    def write(tmp):
        os.makedirs(tmp)
        with open(os.path.join(tmp, "state"), "w") as f:
            f.write(content)
    return write


def test_directories(tmp_path):
    target = str(tmp_path / "epoch_0001")
    write_atomically(target, _write_directory("one"), tmp=str(tmp_path / ".tmp_epoch_0001"))
    assert open(os.path.join(target, "state")).read() == "one"
    # Over an existing directory only with replace_directory; a failure keeps the old one and no temporary.
    with pytest.raises(OSError):
        write_atomically(target, _write_directory("two"))
    assert open(os.path.join(target, "state")).read() == "one" and os.listdir(tmp_path) == ["epoch_0001"]

    def broken(tmp):
        _write_directory("two")(tmp)
        raise RuntimeError("h5py failed")

    with pytest.raises(RuntimeError):
        write_atomically(target, broken, replace_directory=True)
    assert open(os.path.join(target, "state")).read() == "one" and os.listdir(tmp_path) == ["epoch_0001"]
    write_atomically(target, _write_directory("two"), replace_directory=True)
    assert open(os.path.join(target, "state")).read() == "two" and os.listdir(tmp_path) == ["epoch_0001"]


def test_one_temporary_name_for_every_write_and_stale_ones_are_removed(tmp_path):
    """Every temporary jem-tf writes is .NAME.tmp-HOST-PID[SUFFIX] (files.temporary_path), which TEMPORARY parses
    (host names with dots and suffixes included) and remove_stale_temporaries uses to remove dead processes' files
    only."""
    import subprocess
    import sys

    host = socket.gethostname()
    name = os.path.basename(temporary_path(str(tmp_path / "model.keras"), ".keras"))
    assert name == f".model.keras.tmp-{host}-{os.getpid()}.keras"
    assert TEMPORARY.match(name).group("target", "pid", "suffix") == ("model.keras", str(os.getpid()), ".keras")
    assert TEMPORARY.match(".1.tmp-node.example.org-42").group("target", "host", "pid") == ("1", "node.example.org",
                                                                                            "42")
    assert not TEMPORARY.match("model.keras") and not TEMPORARY.match(".model.keras")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale, live, elsewhere = (f".a.tmp-{host}-{gone.pid}.npz", f".b.tmp-{host}-{os.getpid()}",
                              f".c.tmp-other.host-{gone.pid}")
    for entry in (stale, live, elsewhere, "kept.keras"):
        (tmp_path / entry).write_bytes(b"x")
    assert remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / stale)]
    assert sorted(os.listdir(tmp_path)) == sorted([live, elsewhere, "kept.keras"])


def test_json_writes_on_a_full_disk_keep_the_previous_file(tmp_path):
    from jem_tf.files import DiskFullError, atomic_write_json

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1m")
    try:
        path = str(disk / "config.json")
        atomic_write_json(path, {"epochs": 1})
        _fill(disk / "filler")
        with pytest.raises(DiskFullError, match=f"cannot write {path}: the disk is full"):
            atomic_write_json(path, {"epochs": 2, "padding": "x" * 100_000})
        assert json.load(open(path)) == {"epochs": 1} and sorted(os.listdir(disk)) == ["config.json", "filler"]
    finally:
        _umount(disk)
