"""A training run: its work directory's layout, its dataset and its splits.

``python -m jem_tf.train --workdir DIR`` writes one run; ``tune``, ``evaluate`` and ``export`` read
runs back. Everything that must agree between them lives here, once:

* :class:`RunLayout`: the file and directory names inside a work directory;
* :func:`load_run_dataset`: the run's dataset as it saw it (its seed fixes the digits train/test split);
* :func:`split_train_validation`: the one rule that splits the training data into the images the
  model trains on and the validation images it never sees (model selection, temperature scaling and
  the OOD threshold use the latter, so a second rule anywhere would leak training images into them);
* :func:`held_out_split` and :func:`load_trained_model`: what evaluation and export read back.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import zipfile
from typing import NamedTuple, Optional, Tuple

import keras
import numpy as np

from jem_tf.callbacks import ChiefBackupAndRestore, saved_state_bytes
from jem_tf.config import TrainConfig
from jem_tf.conversion import file_sha256, logits_network
from jem_tf.data import ImageDataset, load_dataset, split_validation
from jem_tf.files import atomic_write_json, check_free_space, process_alive, remove_path, write_atomically
from jem_tf.jem import JEM
from jem_tf.seeds import LABELLED_SUBSET


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
        for directory, pattern in ((self.workdir, re.compile(r"^\.?[\w.]+\.tmp-\d+(\.keras)?$")),
                                   (self.workdir, re.compile(r"^\.overwrite-\d+$")),
                                   (self.workdir, re.compile(r"^samples\.png\.tmp$")),
                                   (self.checkpoints, re.compile(r"^\.epoch_\d+\.tmp\.keras$")),
                                   (self.backup, re.compile(r"^\.tmp_epoch_\d+$"))):
            if os.path.isdir(directory) and not os.path.islink(directory):
                found += [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if pattern.match(n)]
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


class Split(NamedTuple):
    """Images and labels of one split."""

    images: np.ndarray
    labels: np.ndarray


def split_train_validation(config: TrainConfig, images: np.ndarray, labels: np.ndarray
                           ) -> Tuple[Split, Optional[Split]]:
    """``(train, validation)`` of a run's training data: stratified and seeded by the config's
    ``validation_fraction`` and ``seed``; ``validation`` is ``None`` when the fraction is 0."""
    if config.validation_fraction <= 0:
        return Split(images, labels), None
    try:
        (x_train, y_train), (x_val, y_val) = split_validation(images, labels, fraction=config.validation_fraction,
                                                              seed=config.seed)
    except ValueError as error:
        raise ValueError(f"Dataset {config.dataset!r}: cannot split off the validation split "
                         f"(validation_fraction={config.validation_fraction}): {error}; change --validation-fraction "
                         "(0: no validation split) or give more training images.") from error
    return Split(x_train, y_train), Split(x_val, y_val)


def check_training_split(config: TrainConfig, train: Split, *, num_classes: int) -> None:
    """A run's training split must hold images of every one of its ``num_classes`` classes (the largest label + 1),
    and of at least 2: a classifier of one class, or of classes it never sees, trains without error and means
    nothing.

    Raises:
        ValueError: naming the dataset and the classes without training images.
    """
    present = np.unique(train.labels)
    where = "training split" + (" (after the validation split)" if config.validation_fraction > 0 else "")
    if len(present) < 2:
        raise ValueError(f"Dataset {config.dataset!r}: the {where} has images of {len(present)} class(es) "
                         f"({', '.join(str(c) for c in present) or 'none'}); a JEM needs at least 2 classes.")
    missing = sorted(set(range(num_classes)) - {int(c) for c in present})
    if missing:
        shown = ", ".join(str(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"Dataset {config.dataset!r}: class(es) {shown} of {num_classes} (class ids 0..the largest "
                         f"label) have no images in the {where}; label the classes 0..K-1, each with training "
                         "images.")


def load_run_dataset(dataset_name: Optional[str] = None, *, config: Optional[TrainConfig] = None,
                     data_dir: Optional[str] = None, download: bool = False) -> ImageDataset:
    """``dataset_name`` (default: the run's) as the run saw it: with the run's ``config`` and its
    dataset, the run's seed (which fixes the digits train/test split) and data directory (unless
    ``data_dir`` overrides it); any other dataset with seed 0."""
    if dataset_name is None:
        if config is None:
            raise ValueError("load_run_dataset needs a dataset name or a run's config.")
        dataset_name = config.dataset
    same_data = config is not None and config.dataset == dataset_name
    return load_dataset(dataset_name, data_dir=data_dir or (config.data_dir if same_data else None),
                        download=download, seed=config.seed if same_data else 0)


def held_out_split(dataset_name: str, *, config: Optional[TrainConfig] = None, data_dir: Optional[str] = None,
                   data: Optional[ImageDataset] = None) -> Tuple[np.ndarray, np.ndarray, str]:
    """In-distribution images and labels that the run did not train on, and which split they are.

    With the run's ``config`` and its dataset, that is the run's validation split
    (:func:`split_train_validation`); otherwise, or when the run had no validation split, the dataset's
    test split. ``data``: the already loaded :func:`load_run_dataset` (loaded here when ``None``).
    """
    if data is None:
        data = load_run_dataset(dataset_name, config=config, data_dir=data_dir)
    if config is not None and config.dataset == dataset_name:
        _, validation = split_train_validation(config, data.x_train, data.y_train)
        if validation is not None:
            return validation.images, validation.labels, "validation"
    return data.x_test, data.y_test, "test"


def select_labelled(config: TrainConfig, train: Split) -> Split:
    """The labelled part of a semi-supervised run's training split: ``config.labels_per_class`` images of each
    class, drawn without replacement, seeded by ``config.seed`` (balanced and reproducible). The validation
    split is separate (:func:`split_train_validation`) and keeps all its labels.

    Raises:
        ValueError: ``labels_per_class`` exceeds the smallest class of the training split.
    """
    n = config.labels_per_class
    classes, counts = np.unique(train.labels, return_counts=True)
    if n is None or n < 1:
        raise ValueError(f"labels_per_class must be an integer >= 1; received {n!r}")
    if n > counts.min():
        smallest = classes[counts.argmin()]
        raise ValueError(f"labels_per_class ({n}) is more than the {counts.min()} training images of class "
                         f"{smallest} (after the validation split); use at most {counts.min()}.")
    rng = np.random.default_rng([config.seed, LABELLED_SUBSET])
    chosen = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), size=n, replace=False) for c in classes])
    chosen.sort()
    return Split(train.images[chosen], train.labels[chosen])


def labelled_training_split(config: TrainConfig, train: Split) -> Split:
    """The training images whose labels the run used: all of ``train``, or a semi-supervised run's labelled
    part (:func:`select_labelled`). Feature statistics fitted after training must see these labels only."""
    return train if config.labels_per_class is None else select_labelled(config, train)


CALIBRATION_SPLITS = ("validation", "test")


def ood_calibration_data(dataset_name: str, *, config: Optional[TrainConfig], data: ImageDataset,
                         calibration_split: str = "validation") -> Tuple[Split, Split]:
    """``(calibration, train)``: the in-distribution images an OOD detector is selected and calibrated on,
    and the training images for its feature statistics.

    ``calibration_split="validation"`` (the default) is the run's validation split, and an error when the
    run has none (``validation_fraction=0``, another dataset, or a bare ``.keras`` file without its run):
    never silently the test split. ``"test"`` uses the test split, explicitly (OOD numbers measured on
    that split afterwards are then not independent of the calibration).
    """
    if calibration_split not in CALIBRATION_SPLITS:
        raise ValueError(f"calibration_split must be one of {CALIBRATION_SPLITS}; received {calibration_split!r}")
    own_run = config is not None and config.dataset == dataset_name
    train, validation = (split_train_validation(config, data.x_train, data.y_train) if own_run
                         else (Split(data.x_train, data.y_train), None))
    if own_run:  # only the labels the run trained with
        train = labelled_training_split(config, train)
    if calibration_split == "test":
        return Split(data.x_test, data.y_test), train
    if validation is None:
        why = ("the run has no validation split (validation_fraction=0)" if own_run else
               "there is no run config for this dataset (a bare .keras file or another dataset)")
        raise ValueError(f"Cannot calibrate the OOD detector on a validation split: {why}. Calibrating on the test "
                         "split must be asked for explicitly (--calibration-split test), and its OOD numbers are "
                         "then not independent of the calibration.")
    return validation, train


def load_run_config(workdir: str) -> Optional[TrainConfig]:
    """The :class:`TrainConfig` a work directory's ``config.json`` holds, or ``None`` without one.

    Raises:
        ValueError: naming the file, when it is not a JSON object of valid config fields.
    """
    path = RunLayout(workdir).config
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        return TrainConfig().replace(**values).validate()
    except (ValueError, TypeError, OSError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a valid run config: {error}") from error


# Settings a resumed run must share with the interrupted one: they fix the shapes of the saved state (network,
# optimizer, replay buffer) or which images are training data. The others (learning rate, SGLD and loss
# settings, epochs, ...) may change on resume, e.g. to get past a divergence.
RESUME_FIXED_FIELDS = ("dataset", "validation_fraction", "seed", "backbone", "width", "normalization", "precision",
                       "batch_size", "optimizer", "buffer_size", "buffer_storage", "chain_init", "chain_init_rank",
                       "pxy_weight", "labels_per_class", "labelled_batch_size", "init_from", "init_from_sha256")


def save_model_atomically(model: keras.Model, path: str) -> None:
    """``model.save(path)`` through a temporary file and a rename: a kill mid-write leaves the previous file
    (or none), never a truncated one; a full disk is a :class:`~jem_tf.files.DiskFullError` naming ``path``, with
    the temporary file removed."""
    directory = os.path.dirname(path) or "."
    check_free_space(directory, saved_state_bytes(model), path)
    write_atomically(path, model.save,
                     tmp=os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}.keras"))


def _check_writable_dir(path: str, what: str) -> None:
    """``ValueError`` unless ``path`` is a directory that can be written or can be created."""
    if not path:
        raise ValueError(f"{what} must not be empty.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a file, not a directory.")
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep))
    existing = existing or "."
    if not os.path.isdir(existing):
        raise ValueError(f"{what} {path!r} cannot be created: {existing!r} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path!r} is not writable (no write permission on {existing!r}).")


def check_output_dir(path: Optional[str], what: str) -> None:
    """Checks an output directory (``--out``, ``--export-dir``) before any work: not empty, not a file, and
    writable or creatable; ``None`` passes."""
    if path is not None:
        _check_writable_dir(path, what)


def prepare_workdir(layout: RunLayout, config: TrainConfig, *, overwrite: bool = False, log=print) -> str:
    """Checks a work directory before a run writes anything to it (it writes nothing itself) and returns its
    :meth:`RunLayout.state`.

    * a finished run is never replaced unless ``overwrite`` (then the caller removes it: :func:`clear_run`);
    * an interrupted run (a backup) is resumed only with a config that matches it in
      :data:`RESUME_FIXED_FIELDS` (else ``ValueError`` naming the differing fields; ``overwrite`` starts over);
    * the directory and ``config.export_dir`` must be writable directories (or creatable).

    Raises:
        ValueError: naming the problem and what to do.
    """
    _check_writable_dir(layout.workdir, "--workdir")
    check_output_dir(config.export_dir, "--export-dir")
    state = layout.state()
    if state == "finished" and not overwrite:
        present = [os.path.basename(p) for p in layout.run_files() if os.path.exists(p)]
        raise ValueError(f"{layout.workdir} holds a finished run ({', '.join(present)}); pass --overwrite to replace "
                         "it, or choose another --workdir.")
    if state == "interrupted" and not overwrite:
        previous = load_run_config(layout.workdir)
        done = ChiefBackupAndRestore.epochs_done(layout.backup)
        if config.epochs < done:
            raise ValueError(f"{layout.workdir} holds an interrupted run with {done} epoch(s) done; --epochs "
                             f"{config.epochs} is fewer: rerun with --epochs {done} or more to resume, or pass "
                             "--overwrite to start over.")
        if previous is not None:
            differing = [f"{name}: {getattr(previous, name)!r} -> {getattr(config, name)!r}"
                         for name in RESUME_FIXED_FIELDS if getattr(previous, name) != getattr(config, name)]
            if differing:
                raise ValueError(f"{layout.workdir} holds an interrupted run whose backup cannot be resumed with "
                                 f"these settings ({'; '.join(differing)}); rerun with the run's settings to resume, "
                                 "or pass --overwrite to start over.")
            changed = [name for name in previous.to_dict() if getattr(previous, name) != getattr(config, name)]
            if changed and log:
                log(f"Resuming {layout.workdir} with changed settings: {', '.join(changed)}.")
    return state


def clear_run(layout: RunLayout, *, log=print) -> None:
    """Removes a run's files from its work directory (``--overwrite``, after every check has passed).

    Each is first renamed into a folder ``.overwrite-PID`` of the work directory (a link is moved as a link: a
    link out of the work directory is never followed), so a failure puts back what was moved and deletes
    nothing (``ValueError`` naming the path); only then is that folder deleted.
    """
    present = [path for path in layout.run_files() if os.path.lexists(path)]
    if not present:
        return
    trash = os.path.join(layout.workdir, f".overwrite-{os.getpid()}")
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
        raise ValueError(f"--overwrite cannot remove {failed} ({error.strerror or error}); nothing was "
                         "deleted.") from error
    shutil.rmtree(trash)  # links inside are removed, not followed
    if log:
        log(f"--overwrite: removed {', '.join(os.path.basename(p) for p in present)} from {layout.workdir}.")


class WorkdirBusy(ValueError):
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

    def check(self) -> None:
        """Raises :class:`WorkdirBusy` naming the holder when the lock is held; writes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return  # no lock (or a work directory that prepare_workdir reports)
        except IsADirectoryError:
            raise WorkdirBusy(f"{self.path} is a directory, not a lock file; remove it.") from None
        try:
            self._judge(fd, not _try_flock(fd))
        finally:
            os.close(fd)  # closing drops a flock taken just to test

    def acquire(self) -> "WorkdirLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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


def _load_keras_archive(path: str, what: str, *, compile: bool = True) -> keras.Model:
    """``keras.models.load_model(path, compile=compile)`` (``safe_mode``: no code from the file) with one-line
    errors."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a .keras archive (truncated or corrupt: not a zip file).")
    try:
        return keras.models.load_model(path, compile=compile)
    except Exception as error:  # corrupt or foreign files raise many types
        raise ValueError(f"Cannot load {path!r} as {what}: {error}") from error


def load_trained_model(model_path: str) -> Tuple[JEM, Optional[TrainConfig]]:
    """``(model, config)`` from a training work directory, or ``(model, None)`` from a ``.keras`` file.

    Raises:
        ValueError: nothing loadable at ``model_path``, or the file holds something other than a JEM.
    """
    config = None
    if os.path.isdir(model_path):
        config = load_run_config(model_path)
        model_path = RunLayout(model_path).model
    if not os.path.isfile(model_path):
        raise ValueError(f"No model at {model_path!r} (expected a .keras file or a training work directory).")
    model = _load_keras_archive(model_path, "a JEM .keras file")
    if not isinstance(model, JEM):
        raise ValueError(f"{model_path!r} holds a {type(model).__name__}, not a jem_tf.JEM.")
    return model, config


class ClassifierSource(NamedTuple):
    """A trained classifier to convert (``--init-from``): its logits network and where it came from."""

    network: keras.Model  # float32 logits network (jem_tf.conversion.logits_network)
    path: str  # the .keras file read (a work directory's model.keras)
    sha256: str
    kind: str  # "jem-tf model" (its backbone) or "keras classifier"
    changes: Tuple[str, ...]  # what was changed to get logits (empty: none)

    def record(self) -> dict:
        """The source as ``metrics.json`` records it."""
        return {"path": os.path.abspath(self.path), "sha256": self.sha256, "kind": self.kind,
                "changes": list(self.changes)}


def classifier_file(path: str) -> str:
    """The ``.keras`` file ``--init-from PATH`` names: ``PATH`` or, for a training work directory, its
    ``model.keras``. ``ValueError`` naming the path when there is none."""
    if os.path.isdir(path):
        model = RunLayout(path).model
        if not os.path.isfile(model):
            raise ValueError(f"--init-from {path!r} is a directory without a trained model ({model} does not exist: "
                             "is its training finished?).")
        return model
    if not os.path.exists(path):
        raise ValueError(f"--init-from {path!r} does not exist.")
    if not os.path.isfile(path):
        raise ValueError(f"--init-from {path!r} is not a regular file.")
    return path


def load_classifier(path: str, *, image_shape, num_classes: int, sha256: Optional[str] = None) -> ClassifierSource:
    """The trained classifier at ``path`` (a training work directory or a ``.keras`` file holding a jem-tf model,
    whose backbone is taken, or any Keras classifier) as a float32 logits network for a JEM of ``image_shape``
    images and ``num_classes`` classes (:func:`jem_tf.conversion.logits_network`).

    Raises:
        ValueError: one line naming the path: missing or unreadable file, another file than ``sha256`` pins,
            not a classifier, or another image shape or class count.
    """
    file = classifier_file(path)
    digest = file_sha256(file)
    if sha256 is not None and digest != sha256:
        raise ValueError(f"--init-from {file!r} has SHA-256 {digest}, not the {sha256} of init_from_sha256 (the file "
                         "changed, or another file was given).")
    model = _load_keras_archive(file, "a Keras classifier", compile=False)  # its loss and optimizer are not used
    kind = "keras classifier"
    if isinstance(model, JEM):
        model, kind = model.backbone, "jem-tf model"
    try:
        network, changes = logits_network(model, image_shape=image_shape, num_classes=num_classes)
    except ValueError as error:
        raise ValueError(f"--init-from {file!r}: {error}") from error
    return ClassifierSource(network, file, digest, kind, tuple(changes))
