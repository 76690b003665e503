"""Nothing lost, every bad input a clear error: `python -m jem_tf.train` (and evaluate/export) on work
directories that hold runs, with hostile paths, recipes and values. CLI cases run as subprocesses and check
the exit code, the single message line, and that the directory's files are byte-identical afterwards."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import CLI_ENV, TINY_TRAIN_ARGS, cli_error_line, file_snapshot

from jem_tf.run.workdir import RunLayout


def _cli(module, *argv, cwd=None):
    return subprocess.run([sys.executable, "-m", f"jem_tf.{module}", *argv], capture_output=True, text=True,
                          timeout=600, env=CLI_ENV, cwd=cwd)


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten_without_overwrite(run_copy):
    before = file_snapshot(run_copy)
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", run_copy)
    assert result.returncode == 2
    assert "holds a finished run" in cli_error_line(result) and "--overwrite" in cli_error_line(result)
    assert file_snapshot(run_copy) == before
    # With --overwrite the old run's files are replaced, and no stale checkpoint outranks the new ones.
    checkpoints = RunLayout(run_copy).checkpoints
    open(os.path.join(checkpoints, "epoch_0060.keras"), "wb").write(b"an old run's checkpoint")
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", run_copy, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(checkpoints)) == ["epoch_0001.keras"]
    assert not os.path.exists(RunLayout(run_copy).backup) and not os.path.exists(RunLayout(run_copy).lock)


@pytest.mark.integration
@pytest.mark.parametrize("argv, message", [
    (["--workdir", ""], "--workdir must not be empty"),
    (["--learning-rate", "inf"], "learning_rate must be a finite number"),
    (["--sgld-noise-std", "inf"], "sgld_noise_std must be a finite number"),
    (["--epochs", "1.5"], "--epochs: invalid int value"),
])
def test_bad_values_are_one_line_errors_before_anything_is_written(argv, message, tmp_path):
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", str(tmp_path / "new"), *argv)
    assert result.returncode == 2 and message in cli_error_line(result)
    assert not os.path.exists(tmp_path / "new") and os.listdir(tmp_path) == []


@pytest.mark.integration
@pytest.mark.parametrize("value, message", [
    ('"one"', "epochs must be an integer; received 'one'"), ("null", "epochs must be an integer; received None"),
    ("1.5", "epochs must be an integer; received 1.5"), ("true", "epochs must be an integer; received True"),
])
def test_recipe_fields_of_the_wrong_type(value, message, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"epochs": %s}' % value)
    result = _cli("train", "--recipe", str(recipe), "--workdir", str(tmp_path / "new"))
    assert result.returncode == 2 and message in cli_error_line(result)
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.slow
def test_paths_that_are_files_or_directories_in_the_wrong_place(tmp_path, finished_run):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", str(a_file))
    assert result.returncode == 2 and "is a file, not a directory" in cli_error_line(result)
    # --export-dir that is a file: refused before training, not after it.
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", str(tmp_path / "new"), "--export-dir", str(a_file))
    assert result.returncode == 2 and "--export-dir" in cli_error_line(result)
    assert not os.path.exists(tmp_path / "new")
    result = _cli("export", "--model", finished_run, "--export-dir", str(a_file))
    assert result.returncode == 2 and "--export-dir" in cli_error_line(result) and "is a file" in cli_error_line(result)
    result = _cli("evaluate", "--model", finished_run, "--out", str(a_file), "--modes", "accuracy")
    assert result.returncode == 2 and "--out" in cli_error_line(result) and a_file.read_text() == "not a directory"
    result = _cli("train", "--recipe", str(tmp_path), "--workdir", str(tmp_path / "new"))
    assert result.returncode == 2 and "is a directory, not a JSON file" in cli_error_line(result)


@pytest.mark.integration
def test_resume_with_settings_that_do_not_fit_the_backup_is_refused(run_copy):
    layout = RunLayout(run_copy)
    # An interrupted run: its backup is what a resume would load.
    os.makedirs(os.path.join(layout.backup, "epoch_0001"))
    open(os.path.join(layout.backup, "epoch_0001", "state.weights.h5"), "wb").write(b"state")
    before = file_snapshot(run_copy)
    result = _cli("train", *[a if a != "100" else "200" for a in TINY_TRAIN_ARGS], "--workdir", run_copy)
    assert result.returncode == 2
    assert "buffer_size: 100 -> 200" in cli_error_line(result) and "--overwrite" in cli_error_line(result)
    assert file_snapshot(run_copy) == before


@pytest.mark.slow
def test_a_work_directory_in_use_is_refused_naming_the_process(run_copy, tmp_path):
    layout = RunLayout(run_copy)
    shutil.rmtree(layout.checkpoints)
    for path in (layout.model, layout.metrics):
        os.remove(path)  # an empty directory apart from the lock: only the lock can stop this run
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with open(layout.lock, "w") as f:
            json.dump({"pid": sleeper.pid, "host": os.uname().nodename, "started_unix": 0}, f)
        before = file_snapshot(run_copy)
        result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", run_copy)
        assert result.returncode == 2 and f"in use by process {sleeper.pid}" in cli_error_line(result)
        assert file_snapshot(run_copy) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone: the lock is stale and the run goes ahead.
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", run_copy)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stale lock" in result.stdout and not os.path.exists(layout.lock)


# The kill during the final save (of the real writer): tests/test_reliability.py.


@pytest.mark.slow
def test_misleading_messages_now_name_the_real_problem(run_copy, tmp_path):
    layout = RunLayout(run_copy)
    data = open(layout.model, "rb").read()
    open(layout.model, "wb").write(data[: len(data) // 3])
    result = _cli("export", "--model", run_copy, "--export-dir", str(tmp_path / "served"))
    assert result.returncode == 2 and "not a .keras archive (truncated or corrupt" in cli_error_line(result)
    open(layout.model, "wb").write(data)
    open(layout.config, "w").write("{ junk")
    result = _cli("evaluate", "--model", run_copy, "--out", str(tmp_path / "eval"), "--modes", "accuracy")
    assert result.returncode == 2 and f"{layout.config} is not a valid run config" in cli_error_line(result)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _cli("evaluate", "--model", layout.model, "--dataset", "digits", "--out", str(tmp_path / "eval"),
                  "--modes", "ood", "--ood", "mnist_5k", "--ood-data-dir", str(empty))
    assert result.returncode == 2 and f"--ood-data-dir {str(empty)!r}" in cli_error_line(result)


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
