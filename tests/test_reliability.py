"""Nothing lost (docs/reliability.md): every check before the first write, locks that cannot be held twice,
hostile data and recipe files, Ctrl-C, a full disk and --overwrite across links. CLI cases run as subprocesses
and check the exit code, the single message line and that the files are unchanged where nothing may change."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from conftest import CLI_ENV, TINY_TRAIN_ARGS, cli_error_line, file_snapshot, leftovers

from jem_tf.run.workdir import RunLayout
from jem_tf.run.workdir_lock import WorkdirBusy, WorkdirLock

UNIFORM = ["--chain-init", "uniform", "--chain-init-uniform-fraction", "0"]


def _cli(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "jem_tf.train", *argv], capture_output=True, text=True,
                          timeout=timeout, env=CLI_ENV)


@pytest.fixture
def interrupted_run(finished_run, tmp_path):
    """A copy of a finished run with a backup of 2 epochs, as a run killed in epoch 3 leaves it."""
    copy = str(tmp_path / "run")
    shutil.copytree(finished_run, copy)
    layout = RunLayout(copy)
    generation = os.path.join(layout.backup, "epoch_0002")
    os.makedirs(generation)
    open(os.path.join(generation, "state.weights.h5"), "wb").write(b"state")
    json.dump({"epoch": 2, "optimizer_step": 12}, open(os.path.join(generation, "training_metadata.json"), "w"))
    for path in (layout.model, layout.metrics):
        os.remove(path)
    return copy


def _npz(path, y_train, y_test, image_shape=(8, 8)):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (len(y_train),) + image_shape, dtype=np.uint8),
             y_train=np.asarray(y_train, np.int64),
             x_test=rng.integers(0, 256, (len(y_test),) + image_shape, dtype=np.uint8),
             y_test=np.asarray(y_test, np.int64))
    return str(path)


# ---------------------------------------------------------------------------- 6, 8: checks before writes
@pytest.mark.integration
def test_resume_with_fewer_epochs_than_done_is_refused_before_any_write(interrupted_run):
    before = file_snapshot(interrupted_run)
    result = _cli(*TINY_TRAIN_ARGS, "--workdir", interrupted_run)  # --epochs 1, 2 done
    assert result.returncode == 2
    line = cli_error_line(result)
    assert "2 epoch(s) done; --epochs 1 is fewer" in line and "--epochs 2 or more" in line, line
    assert file_snapshot(interrupted_run) == before  # config.json is not rewritten


@pytest.mark.integration
@pytest.mark.parametrize("case", ["single_class_uniform", "single_class_default_recipe", "absent_class",
                                  "five_images", "validation_fraction_0.99"])
def test_data_problems_are_one_line_errors_before_the_work_directory_is_written(case, tmp_path):
    workdir = tmp_path / "new"
    if case.startswith("single_class"):  # labels all 3: a "4-class" model of one class
        data = _npz(tmp_path / "one.npz", [3] * 40, [3] * 10)
        argv = ([*TINY_TRAIN_ARGS, "--dataset", data, *UNIFORM] if case.endswith("uniform")
                else ["--dataset", data, "--epochs", "1", "--verbose", "0"])  # the digits recipe's class Gaussians
        expected = ("the training split (after the validation split) has images of 1 class(es) (3); a JEM needs at "
                    "least 2")
    elif case == "absent_class":  # class 1 only in the test split
        data = _npz(tmp_path / "gap.npz", [0, 2] * 20, [0, 1, 2] * 4)
        argv = [*TINY_TRAIN_ARGS, "--dataset", data, *UNIFORM]
        expected = "class(es) 1 of 3 (class ids 0..the largest label) have no images in the training split"
    elif case == "five_images":
        data = _npz(tmp_path / "five.npz", [0, 1, 2, 0, 1], [0, 1, 2])
        argv = [*TINY_TRAIN_ARGS, "--dataset", data]
        expected = (f"Dataset {data!r}: cannot split off the validation split (validation_fraction=0.1): class 2 "
                    "has 1 image (of 5)")
    else:  # 14 training images of 10 digits: a class Gaussian of one image
        argv = [*TINY_TRAIN_ARGS, "--validation-fraction", "0.99", "--chain-init", "class_gaussian"]
        expected = "Every class needs at least 2 images to fit its Gaussian"
    result = _cli(*argv, "--workdir", str(workdir))
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in cli_error_line(result), cli_error_line(result)
    assert not workdir.exists()


# ------------------------------------------------------------- 9: split messages, recipe files, downloads
def test_scikit_learn_split_errors_are_ours():
    from jem_tf.run.config import TrainConfig
    from jem_tf.run.splits import split_train_validation

    x = np.zeros((30, 8, 8, 1), np.float32)
    y = np.arange(30) % 10
    with pytest.raises(ValueError, match=r"'mine.npz'.*validation_fraction=0.1\): its 3 validation image\(s\) of 30 "
                                         r"are fewer than the 10 classes"):
        split_train_validation(TrainConfig(dataset="mine.npz", validation_fraction=0.1), x, y)
    with pytest.raises(ValueError, match=r"it leaves 3 training image\(s\) of 30, fewer than the 10 classes"):
        split_train_validation(TrainConfig(validation_fraction=0.9), x, y)
    train, validation = split_train_validation(TrainConfig(validation_fraction=0.34), x, y)
    assert len(train.images) == 19 and len(validation.images) == 11


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["device", "fifo", "huge"])
def test_recipes_that_are_not_regular_files_or_too_big(kind, tmp_path):
    if kind == "device":
        recipe = "/dev/zero"
    elif kind == "fifo":
        recipe = str(tmp_path / "recipe.json")
        os.mkfifo(recipe)  # opening it would block forever
    else:
        recipe = str(tmp_path / "huge.json")
        with open(recipe, "wb") as f:
            f.truncate(1 << 30)  # 1 GiB (sparse): refused by its size, never read
    result = _cli("--recipe", recipe, "--workdir", str(tmp_path / "new"), timeout=120)
    assert result.returncode == 2
    line = cli_error_line(result)
    if kind == "huge":
        assert f"Recipe {recipe!r} is 1,073,741,824 bytes, more than a recipe's limit of 1,048,576" in line, line
    else:
        assert f"Recipe {recipe!r} is not a regular file" in line, line
    assert not (tmp_path / "new").exists()


def test_missing_tfds_data_says_how_to_download(tmp_path):
    from jem_tf.data import DataNotFoundError, load_dataset

    with pytest.raises(DataNotFoundError, match="or pass --download true"):
        load_dataset("mnist", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------- 7: forged npz
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


# ---------------------------------------------------------------------------------------------- 3, 4: locks
HOLD_LOCK = """
import sys, time
from jem_tf.run.workdir import RunLayout
from jem_tf.run.workdir_lock import WorkdirLock
lock = WorkdirLock(RunLayout(sys.argv[1]), log=None).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_lock(workdir, seconds=600):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir, str(seconds)], stdout=subprocess.PIPE,
                              text=True, env=CLI_ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_live_lock_is_reported_before_any_other_check(interrupted_run):
    holder = _hold_lock(interrupted_run)
    try:
        before = file_snapshot(interrupted_run)
        # Other settings than the backup's (buffer_size): the busy directory is what must be reported.
        other_buffer = [a if a != "100" else "200" for a in TINY_TRAIN_ARGS]
        result = _cli(*other_buffer, "--epochs", "3", "--workdir", interrupted_run)
        assert result.returncode == 2
        line = cli_error_line(result)
        assert f"is in use by process {holder.pid} on {os.uname().nodename}" in line, line
        assert "interrupted run" not in line
        assert file_snapshot(interrupted_run) == before
    finally:
        holder.kill()
        holder.wait()


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


# ------------------------------------------------- 5: Ctrl-C (export temporaries: tests/test_serving_limits.py)
UNTIL_EVENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "train_until_event.py")


def _start_until_event(event, when, *argv):
    """A training that stops at ``when`` (see helpers/train_until_event.py), signals ``event`` and waits there."""
    run = subprocess.Popen([sys.executable, UNTIL_EVENT, str(event), when, *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=CLI_ENV)
    deadline = time.time() + 300
    while not os.path.exists(event):
        if run.poll() is not None or time.time() > deadline:
            run.kill()
            out, err = run.communicate()
            pytest.fail(f"the run ended before its event ({run.returncode}):\n{err[-3000:]}")
        time.sleep(0.05)
    return run


def _finish(run, timeout):
    """``run.communicate(timeout=...)``; a run still going at the timeout writes its threads' stacks (SIGUSR1, see
    helpers/train_until_event.py), is killed, and the test fails with the end of its stderr."""
    try:
        return run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGUSR1)
        time.sleep(2)
        run.kill()
        out, err = run.communicate()
        lines = [line for line in err.splitlines() if not line.startswith(("I0000", "E0000", "W0000", "WARNING: All"))]
        pytest.fail(f"the run did not end within {timeout} s; its stderr (last lines):\n" + "\n".join(lines[-150:]))


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_same_command_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    argv = [*TINY_TRAIN_ARGS, "--epochs", "2", "--workdir", workdir]
    run = _start_until_event(tmp_path / "event", "batch:1:2", *argv)  # mid-epoch 2 (of 6 batches)
    run.send_signal(signal.SIGINT)
    out, err = _finish(run, 120)
    assert run.returncode == 130, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("python -m jem_tf.train")]
    assert ours == ["python -m jem_tf.train: interrupted; rerun the same command to resume from epoch 2"], err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    layout = RunLayout(workdir)
    assert not os.path.exists(layout.lock) and not os.path.exists(layout.model) and not leftovers(workdir)
    result = _cli(*argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resuming from the backup" in result.stdout and "1 epoch(s) done" in result.stdout


# ------------------------------------------------------------------------------ 2: --overwrite and links
@pytest.mark.slow
def test_overwrite_never_follows_a_link_out_of_the_work_directory(run_copy, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's")
    layout = RunLayout(run_copy)
    shutil.rmtree(layout.logs)
    os.symlink(str(outside), layout.logs)
    result = _cli(*TINY_TRAIN_ARGS, "--workdir", run_copy, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (outside / "keep.txt").read_text() == "not the run's" and os.listdir(outside) == ["keep.txt"]
    assert os.path.isdir(layout.logs) and not os.path.islink(layout.logs) and not leftovers(run_copy)


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs to mount a tmpfs (root in a machine that allows it)")


def _fill(path):
    """Writes ``path`` until its file system is full (unbuffered: nothing is left to flush on close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError:
                pass
    finally:
        os.close(fd)


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.integration
def test_overwrite_that_fails_half_way_deletes_nothing(run_copy):
    layout = RunLayout(run_copy)
    saved = layout.checkpoints + ".saved"
    shutil.move(layout.checkpoints, saved)
    _mount_tmpfs(layout.checkpoints, "16m")  # a mount point cannot be renamed away: the removal fails there
    try:
        for name in os.listdir(saved):
            shutil.copy(os.path.join(saved, name), layout.checkpoints)
        shutil.rmtree(saved)
        before = file_snapshot(run_copy)
        result = _cli(*TINY_TRAIN_ARGS, "--workdir", run_copy, "--overwrite")
        assert result.returncode == 2
        line = cli_error_line(result)
        assert f"--overwrite cannot remove {layout.checkpoints}" in line and "nothing was deleted" in line, line
        assert file_snapshot(run_copy) == before and not leftovers(run_copy)
    finally:
        _umount(layout.checkpoints)


# ------------------------------------------------------------------------------------------- 1: disk full
@pytest.mark.slow
def test_a_full_disk_is_one_line_keeps_the_last_good_backup_and_the_rerun_completes(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64m")
    try:
        workdir = str(disk / "run")
        argv = [*TINY_TRAIN_ARGS, "--epochs", "3", "--workdir", workdir]
        event = tmp_path / "event"
        run = _start_until_event(event, "batch:1:5", *argv)  # epoch 1 backed up; the last batch of epoch 2
        filler = disk / "filler"
        _fill(filler)  # the disk fills up while the run trains
        os.remove(event)  # the run goes on: epoch 2's backup does not fit
        out, err = _finish(run, 300)
        assert run.returncode == 1, err[-3000:]
        line = [line for line in err.splitlines() if line.startswith("python -m jem_tf.train")]
        assert len(line) == 1 and "Traceback" not in err, err[-3000:]
        backup = os.path.join(workdir, "backup")
        assert (f"error: cannot write {os.path.join(backup, 'epoch_0002')}: the disk is full (no space left on "
                f"device); the last good epoch (1) is kept in {backup}; free space and rerun the same command to resume"
                in line[0]), line
        layout = RunLayout(workdir)
        assert os.listdir(layout.backup) == ["epoch_0001"] and not leftovers(workdir)
        assert not os.path.exists(layout.lock) and not os.path.exists(layout.model)
        os.remove(filler)  # space freed: the same command completes
        result = _cli(*argv)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "1 epoch(s) done" in result.stdout and os.path.isfile(layout.model) and not leftovers(workdir)
    finally:
        _umount(disk)


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


# ------------------------------------------------------------------ 10: semi-supervised p(x|y), several steps
@pytest.mark.integration
@pytest.mark.parametrize("px_weight", [0.0, 1.0])
def test_unlabelled_rows_never_draw_or_write_class_conditional_chains(tiny_data, px_weight):
    from conftest import tiny_jem

    from jem_tf import SGLDSampler

    x, y = tiny_data
    x = x[:32]
    weights = (np.arange(32) % 4 == 0).astype("float32")  # 8 labelled rows (classes 1 and 2), 24 unlabelled
    labelled_classes = 1 + (np.arange(32) // 4) % 2
    runs = []
    for placeholder in (0, 2):  # what the unlabelled rows carry must not matter
        labels = np.where(weights > 0, labelled_classes, placeholder).astype("int32")
        model = tiny_jem(data_noise_std=0.0, restart_prob=0.0, pxy_weight=1.0, px_weight=px_weight,
                         sampler=SGLDSampler(n_steps=2, noise_std=0.0))
        initial = model.replay_buffer.samples.numpy().copy()
        for _ in range(3):
            model.train_on_batch(x, labels, sample_weight=weights)
        runs.append((initial, model.replay_buffer.samples.numpy(), [v.numpy() for v in model.trainable_variables]))
    (initial, buffer_a, weights_a), (_, buffer_b, weights_b) = runs
    np.testing.assert_array_equal(buffer_a, buffer_b)
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    slot = 64 // 3  # slots per class (buffer 64, 3 classes): class 0 is rows [0, 21)
    changed = np.any(buffer_a != initial, axis=(1, 2, 3))
    assert changed[slot:].any()  # the labelled classes' chains were written back
    if px_weight == 0:  # only p(x|y) writes: class 0 has no labelled row, so its slots are untouched
        assert not changed[:slot].any()


# ----------------------------------------------------------------------- 11: every input path under XLA
@pytest.mark.parametrize("jit_compile", [True, False])
def test_train_on_batch_and_fit_on_tensors_are_checked_under_xla_as_without(tiny_data, jit_compile):
    import keras
    import tensorflow as tf
    from conftest import tiny_jem

    x, y = tiny_data
    model = tiny_jem()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    initial = model.backbone.get_weights()
    errors = (ValueError, tf.errors.InvalidArgumentError)  # eager check / in-graph check (without XLA)
    bright, nan = tf.constant(np.full_like(x[:32], 5.0)), tf.constant(np.full_like(x[:32], np.nan))
    labels, bad_labels = tf.constant(y[:32]), tf.constant(np.full_like(y[:32], 7))
    for call in (lambda: model.train_on_batch(bright, labels),
                 lambda: model.train_on_batch(np.full_like(x[:32], 5.0), y[:32]),
                 lambda: model.train_on_batch(tf.constant(x[:32]), bad_labels),
                 lambda: model.fit(bright, labels, epochs=1, verbose=0),
                 lambda: model.fit(nan, labels, epochs=1, verbose=0),
                 lambda: model.test_on_batch(bright, labels)):
        with pytest.raises(errors, match=r"(?i)lie in \[-1.0, 1.0\]|NaN|Labels must be"):
            call()
    for before, after in zip(initial, model.backbone.get_weights()):  # no step trained on bad data
        np.testing.assert_array_equal(before, after)
    if jit_compile:  # checked before Keras is called: not even the step counter moved
        assert int(model.optimizer.iterations.numpy()) == 0


# ---------------------------------------------------------------- 13: kills that land where they are meant to
@pytest.mark.slow
def test_a_kill_of_the_real_writer_during_the_final_save_loses_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    argv = [*TINY_TRAIN_ARGS, "--epochs", "2", "--workdir", workdir]
    run = _start_until_event(tmp_path / "event", "final-save", *argv)  # model.keras written, not yet renamed
    layout = RunLayout(workdir)
    partial = [name for name in os.listdir(workdir) if name.startswith(".model.keras.tmp-")]
    assert len(partial) == 1 and not os.path.exists(layout.model)  # the kill lands during the final save
    run.kill()
    run.communicate()
    assert run.returncode == -signal.SIGKILL and os.path.isdir(layout.backup)  # the backup survives the kill
    result = _cli(*argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resuming from the backup" in result.stdout and "2 epoch(s) done" in result.stdout
    import keras

    assert keras.models.load_model(layout.model).optimizer.iterations.numpy() == 2 * 6  # 1,293 images / 256
    assert not os.path.exists(layout.backup) and not leftovers(workdir)  # the killed writer's file is gone
