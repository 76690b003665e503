"""A run's work directory: its layout (:class:`RunLayout`), its config file, and the checks and clean-up done
before a run writes to it.

``python -m jem_tf.train --workdir DIR`` writes one run; ``tune``, ``evaluate`` and ``export`` read runs back.
The lock that keeps one training per work directory is :mod:`jem_tf.run.workdir_lock`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Optional

import keras
import numpy as np

from jem_tf.errors import UsageError
from jem_tf.files import (
    TEMPORARY,
    check_free_space,
    remove_path,
    temporary_path,
    write_atomically,
)
from jem_tf.run.config import TrainConfig
from jem_tf.run.config_rules import RESUME_FIXED_FIELDS

# The temporaries of runs written by older jem-tf versions (before files.temporary_path), cleaned up the same way.
_OLD_TEMPORARIES = (re.compile(r"^\.?[\w.]+\.tmp-\d+(\.keras)?$"), re.compile(r"^\.overwrite-\d+$"),
                    re.compile(r"^samples\.png\.tmp$"), re.compile(r"^\.epoch_\d+\.tmp\.keras$"),
                    re.compile(r"^\.tmp_epoch_\d+$"))


# A backup (WORKDIR/backup, jem_tf.training.callbacks.ChiefBackupAndRestore) holds generations epoch_NNNN/ with the
# model's
# weights and a small JSON of the epoch and optimizer step.
BACKUP_GENERATION = re.compile(r"^epoch_(\d+)$")
BACKUP_WEIGHTS = "state.weights.h5"
BACKUP_METADATA = "training_metadata.json"


def saved_state_bytes(model: keras.Model) -> int:
    """About the bytes a save of ``model`` (weights, optimizer slots, replay buffer) takes, with a margin: checked
    as free space before writing (h5py can crash the process on a full disk instead of raising)."""
    variables = list(model.variables) + (list(model.optimizer.variables) if model.optimizer is not None else [])
    raw = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    return int(raw * 1.1) + (1 << 20)


def numbered_entries(directory: str, pattern: re.Pattern):
    """``(number, path)`` of the entries of ``directory`` whose name matches ``pattern`` (one group: the
    number), in increasing order; empty if the directory does not exist."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def backup_epochs_done(backup_dir: str) -> int:
    """The epochs a backup in ``backup_dir`` holds (its newest generation whose metadata reads; 0: none), read
    without loading it, e.g. to check a resumed run's ``epochs`` before anything is written."""
    for _, directory in numbered_entries(backup_dir, BACKUP_GENERATION)[::-1]:
        try:
            with open(os.path.join(directory, BACKUP_METADATA)) as f:
                return int(json.load(f)["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return 0


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The files of a work directory ``workdir``.

    * ``model.keras``: the final model (weights, optimizer, replay buffer);
    * ``config.json``: the run's :class:`TrainConfig`; ``metrics.json``: its final metrics;
    * ``samples.png``: replay-buffer samples at the end;
    * ``checkpoints/``: the last epochs' ``.keras`` files; ``logs/``: TensorBoard;
    * ``backup/``: the training state of the last finished epoch while training runs (resumption);
    * ``precision.json``: the choice of ``precision="auto"`` (a resumed run reuses it);
    * ``.lock``: held by the process training in it (:class:`WorkdirLock`).
    """

    workdir: str

    MODEL_FILE = "model.keras"
    CONFIG_FILE = "config.json"
    METRICS_FILE = "metrics.json"
    SAMPLES_FILE = "samples.png"
    CHECKPOINTS_DIR = "checkpoints"
    LOGS_DIR = "logs"
    BACKUP_DIR = "backup"
    PRECISION_FILE = "precision.json"
    LOCK_FILE = ".lock"

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    @property
    def model(self) -> str:
        return self._path(self.MODEL_FILE)

    @property
    def config(self) -> str:
        return self._path(self.CONFIG_FILE)

    @property
    def metrics(self) -> str:
        return self._path(self.METRICS_FILE)

    @property
    def samples(self) -> str:
        return self._path(self.SAMPLES_FILE)

    @property
    def checkpoints(self) -> str:
        return self._path(self.CHECKPOINTS_DIR)

    @property
    def logs(self) -> str:
        return self._path(self.LOGS_DIR)

    @property
    def backup(self) -> str:
        return self._path(self.BACKUP_DIR)

    @property
    def precision(self) -> str:
        return self._path(self.PRECISION_FILE)

    @property
    def lock(self) -> str:
        return self._path(self.LOCK_FILE)

    def run_files(self) -> list:
        """The paths a training run writes (files and directories), whether they exist or not."""
        return [self.model, self.config, self.metrics, self.samples, self.precision, self.checkpoints, self.logs,
                self.backup]

    def temporaries(self) -> list:
        """The temporary files and directories of interrupted writes (``model.keras``, JSON files, checkpoints, a
        backup generation, the sample grid); only the lock's holder writes, so under the lock they are stale."""
        found = []
        for directory in (self.workdir, self.checkpoints, self.backup):
            if os.path.isdir(directory) and not os.path.islink(directory):
                found += [os.path.join(directory, n) for n in sorted(os.listdir(directory))
                          if TEMPORARY.match(n) or any(p.match(n) for p in _OLD_TEMPORARIES)]
        return found

    def state(self) -> str:
        """``"empty"`` (no run's files), ``"interrupted"`` (a backup to resume from) or ``"finished"`` (a
        final model, metrics or checkpoints and no backup)."""
        if os.path.isdir(self.backup) and os.listdir(self.backup):
            return "interrupted"
        if (os.path.exists(self.model) or os.path.exists(self.metrics)
                or (os.path.isdir(self.checkpoints) and os.listdir(self.checkpoints))):
            return "finished"
        return "empty"


def _read_json_object(path: str, what: str, parse=lambda values: values):
    """``parse(the JSON object in path)``, ``None`` when there is no such file; a ``UsageError`` naming the file and
    ``what`` it should be when it is unreadable, not a JSON object, or ``parse`` refuses it (``ValueError``,
    ``TypeError``)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        return parse(values)
    except (ValueError, TypeError, OSError) as error:  # JSONDecodeError is a ValueError
        raise UsageError(f"{path} is not a valid {what}: {error}") from error


def load_run_config(workdir: str) -> Optional[TrainConfig]:
    """The :class:`TrainConfig` a work directory's ``config.json`` holds, or ``None`` without one.

    Raises:
        UsageError: naming the file, when it is not a JSON object of valid config fields.
    """
    return _read_json_object(RunLayout(workdir).config, "run config",
                             lambda values: TrainConfig().replace(**values).validate())


def load_run_metrics(workdir: str) -> Optional[dict]:
    """The final metrics a finished run's ``metrics.json`` holds, or ``None`` (no work directory, or not finished).

    Raises:
        UsageError: naming the file, when it is not a JSON object.
    """
    return _read_json_object(RunLayout(workdir).metrics, "metrics file")


def save_model_atomically(model: keras.Model, path: str) -> None:
    """``model.save(path)`` through a temporary file and a rename: a kill mid-write leaves the previous file
    (or none), never a truncated one; a full disk is a :class:`~jem_tf.files.DiskFullError` naming ``path``, with
    the temporary file removed."""
    directory = os.path.dirname(path) or "."
    check_free_space(directory, saved_state_bytes(model), path)
    write_atomically(path, model.save, suffix=".keras")


def _check_writable_dir(path: str, what: str) -> None:
    """``UsageError`` unless ``path`` is a directory that can be written or can be created."""
    if not path:
        raise UsageError(f"{what} must not be empty.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a file, not a directory.")
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep))
    existing = existing or "."
    if not os.path.isdir(existing):
        raise UsageError(f"{what} {path!r} cannot be created: {existing!r} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path!r} is not writable (no write permission on {existing!r}).")


def check_output_dir(path: Optional[str], what: str) -> None:
    """Checks an output directory (``--out``, ``--export-dir``) before any work: not empty, not a file, and
    writable or creatable; ``None`` passes."""
    if path is not None:
        _check_writable_dir(path, what)


def _within(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _check_source_outside_run(layout: RunLayout, init_from: str) -> None:
    """``UsageError`` when ``--init-from`` names this work directory or one of its run files (compared as
    written and with links resolved; a linked run file is moved, not followed, so its target is safe)."""
    source = init_from
    if os.path.isdir(source):
        source = RunLayout(source).model
    for run_file in layout.run_files():
        as_written = _within(os.path.abspath(source), os.path.abspath(run_file))
        resolved = not os.path.islink(run_file) and _within(os.path.realpath(source), os.path.realpath(run_file))
        if as_written or resolved:
            raise UsageError(f"--init-from {init_from!r} lies inside the run files of --workdir {layout.workdir!r} "
                             f"({run_file}), which --overwrite clears and checkpoint rotation deletes: the run would "
                             "destroy the classifier it converts. Copy it out of the work directory first.")


def prepare_workdir(layout: RunLayout, config: TrainConfig, *, overwrite: bool = False, log=print) -> str:
    """Checks a work directory before a run writes anything to it (it writes nothing itself) and returns its
    :meth:`RunLayout.state`.

    * a finished run is never replaced unless ``overwrite`` (then the caller removes it: :func:`clear_run`);
    * an interrupted run (a backup) is resumed only with a config that matches it in
      :data:`~jem_tf.run.config_rules.RESUME_FIXED_FIELDS` (else ``UsageError`` naming the differing fields;
      ``overwrite`` starts over);
    * the directory and ``config.export_dir`` must be writable directories (or creatable);
    * a classifier to convert (``config.init_from``) must not lie among the run's files, which ``overwrite``
      clears and checkpoint rotation deletes: the run would destroy its own source.

    Raises:
        UsageError: naming the problem and what to do.
    """
    _check_writable_dir(layout.workdir, "--workdir")
    check_output_dir(config.export_dir, "--export-dir")
    if config.init_from is not None:
        _check_source_outside_run(layout, config.init_from)
    state = layout.state()
    if state == "finished" and not overwrite:
        present = [os.path.basename(p) for p in layout.run_files() if os.path.exists(p)]
        raise UsageError(f"{layout.workdir} holds a finished run ({', '.join(present)}); pass --overwrite to replace "
                         "it, or choose another --workdir.")
    if state == "interrupted" and not overwrite:
        previous = load_run_config(layout.workdir)
        done = backup_epochs_done(layout.backup)
        if config.epochs < done:
            raise UsageError(f"{layout.workdir} holds an interrupted run with {done} epoch(s) done; --epochs "
                             f"{config.epochs} is fewer: rerun with --epochs {done} or more to resume, or pass "
                             "--overwrite to start over.")
        if previous is not None:
            differing = [f"{name}: {getattr(previous, name)!r} -> {getattr(config, name)!r}"
                         for name in RESUME_FIXED_FIELDS if getattr(previous, name) != getattr(config, name)]
            if differing:
                raise UsageError(f"{layout.workdir} holds an interrupted run whose backup cannot be resumed with "
                                 f"these settings ({'; '.join(differing)}); rerun with the run's settings to resume, "
                                 "or pass --overwrite to start over.")
            changed = [name for name in previous.to_dict() if getattr(previous, name) != getattr(config, name)]
            if changed and log:
                log(f"Resuming {layout.workdir} with changed settings: {', '.join(changed)}.")
    return state


def clear_run(layout: RunLayout, *, log=print) -> None:
    """Removes a run's files from its work directory (``--overwrite``, after every check has passed).

    Each is first renamed into a temporary folder ``.overwrite.tmp-HOST-PID`` of the work directory (a link is
    moved as a link: a link out of the work directory is never followed), so a failure puts back what was moved
    and deletes nothing (``UsageError`` naming the path); only then is that folder deleted.
    """
    present = [path for path in layout.run_files() if os.path.lexists(path)]
    if not present:
        return
    trash = temporary_path(os.path.join(layout.workdir, "overwrite"))
    remove_path(trash)
    os.makedirs(trash)
    moved = []
    try:
        for path in present:
            os.rename(path, os.path.join(trash, os.path.basename(path)))
            moved.append(path)
    except OSError as error:
        failed = path
        for path in reversed(moved):  # put back what was moved
            os.rename(os.path.join(trash, os.path.basename(path)), path)
        os.rmdir(trash)
        raise UsageError(f"--overwrite cannot remove {failed} ({error.strerror or error}); nothing was "
                         "deleted.") from error
    shutil.rmtree(trash)  # links inside are removed, not followed
    if log:
        log(f"--overwrite: removed {', '.join(os.path.basename(p) for p in present)} from {layout.workdir}.")
