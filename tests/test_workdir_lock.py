"""jem_tf.run.workdir_lock: one training per work directory; stale, foreign and hostile locks."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import CLI_ENV

from jem_tf.run.workdir import RunLayout
from jem_tf.run.workdir_lock import WorkdirBusy, WorkdirLock


@pytest.mark.parametrize("content", [b"", b"[1]", b"\x00\xffgarbage", b'{"pid": "x"}',
                                     b'{"pid": 999999999, "host": "%s"}'])
def test_an_empty_or_garbage_lock_nobody_holds_is_stale(content, tmp_path):
    layout = RunLayout(str(tmp_path))
    content = content.replace(b"%s", os.uname().nodename.encode())
    open(layout.lock, "wb").write(content)
    messages = []
    WorkdirLock(layout).check()  # not held: no error
    with WorkdirLock(layout, log=messages.append):
        assert json.load(open(layout.lock))["pid"] == os.getpid()
        with pytest.raises(WorkdirBusy, match=f"in use by process {os.getpid()}"):
            WorkdirLock(layout).acquire()  # held (a second open file of this same process)
    assert not os.path.exists(layout.lock)
    assert bool(messages) == bool(content) and all("stale lock" in m for m in messages)


def test_a_lock_of_another_host_is_respected_and_the_way_past_it_is_named(tmp_path):
    layout = RunLayout(str(tmp_path))
    json.dump({"pid": 1, "host": "elsewhere.example", "started_unix": 0}, open(layout.lock, "w"))
    with pytest.raises(WorkdirBusy, match=rf"process 1 on elsewhere.example .*if that process is gone, delete "
                                          rf"{layout.lock}"):
        WorkdirLock(layout).acquire()
    os.remove(layout.lock)  # the documented way past it
    with WorkdirLock(layout, log=None):
        pass


RACE = """
import os, sys, time
from jem_tf.run.workdir import RunLayout
from jem_tf.run.workdir_lock import WorkdirBusy, WorkdirLock
go = sys.argv[2]
open(f"{go}.ready.{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
try:
    lock = WorkdirLock(RunLayout(sys.argv[1]), log=None).acquire()
except WorkdirBusy:
    print("busy", flush=True)
else:
    print("won", flush=True)
    time.sleep(3)
"""


@pytest.mark.slow
def test_two_processes_taking_over_the_same_stale_lock_never_both_hold_it(tmp_path):
    layout = RunLayout(str(tmp_path))
    json.dump({"pid": 999999999, "host": os.uname().nodename}, open(layout.lock, "w"))  # stale
    go = str(tmp_path / "go")
    racers = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), go], stdout=subprocess.PIPE, text=True,
                               env=CLI_ENV) for _ in range(3)]
    deadline = time.time() + 120
    while sum(name.startswith("go.ready.") for name in os.listdir(tmp_path)) < len(racers):  # all imported
        assert time.time() < deadline
        time.sleep(0.05)
    open(go, "w").close()
    outcomes = sorted(r.communicate(timeout=120)[0].strip() for r in racers)
    assert outcomes == ["busy", "busy", "won"], outcomes


def test_a_lock_that_is_a_link_or_not_a_file_is_refused_and_its_target_never_written(tmp_path):
    from jem_tf.run.workdir_lock import WorkdirBusy, WorkdirLock

    layout = RunLayout(str(tmp_path / "run"))
    os.makedirs(layout.workdir)
    target = tmp_path / "precious.txt"
    target.write_text("a user's file")
    os.symlink(target, layout.lock)
    for call in (WorkdirLock(layout).check, WorkdirLock(layout).acquire):
        with pytest.raises(WorkdirBusy, match="is a symbolic link, not a lock file"):
            call()
    assert target.read_text() == "a user's file"
    os.remove(layout.lock)
    os.symlink(tmp_path / "missing", layout.lock)  # a dangling link: never created through
    with pytest.raises(WorkdirBusy, match="symbolic link"):
        WorkdirLock(layout).acquire()
    assert not (tmp_path / "missing").exists()
    os.remove(layout.lock)
    os.mkfifo(layout.lock)  # would block an open for reading
    with pytest.raises(WorkdirBusy, match="not a regular file"):
        WorkdirLock(layout).check()
