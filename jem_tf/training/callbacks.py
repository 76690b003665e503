"""Keras callbacks for JEM training: sample grids and atomic, rotating checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from jem_tf.figures import image_grid, upscale, write_png
from jem_tf.files import check_free_space, write_atomically
from jem_tf.keras_workarounds import set_initial_epoch
from jem_tf.run.workdir import (
    BACKUP_GENERATION,
    BACKUP_METADATA,
    BACKUP_WEIGHTS,
    numbered_entries,
    saved_state_bytes,
)


class SampleGridCallback(keras.callbacks.Callback):
    """Every ``every_epochs`` epochs (and at the end) draws replay-buffer chains and writes them
    as an image grid to TensorBoard (``log_dir``) and, at the end, to ``png_path``.

    Args:
        log_dir: TensorBoard directory (``None`` to skip TensorBoard).
        png_path: Where to write the final PNG grid (``None`` to skip).
        num_images: Images per grid. Default 64.
        every_epochs: Period in epochs. Default 5.
        seed: Seed of the draws.
    """

    def __init__(self, *, log_dir: Optional[str], png_path: Optional[str], num_images: int = 64,
                 every_epochs: int = 5, seed: int = 0):
        super().__init__()
        self.log_dir = log_dir
        self.png_path = png_path
        self.num_images = num_images
        self.every_epochs = every_epochs
        self.seed = seed
        self._writer = None

    def _grid(self) -> np.ndarray:
        samples = self.model.sample(self.num_images, seed=self.seed, init="buffer", n_steps=0)
        grid = image_grid(samples, value_range=self.model.value_range)
        return upscale(grid, max(1, 256 // grid.shape[0]))

    def _write_summary(self, grid: np.ndarray, step: int) -> None:
        if self.log_dir is None:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "samples"))
        with self._writer.as_default():
            tf.summary.image("replay_buffer_samples", grid[None], step=step)
        self._writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_epochs == 0:
            self._write_summary(self._grid(), epoch + 1)

    def on_train_end(self, logs=None):
        grid = self._grid()
        if self.png_path is not None:
            write_png(self.png_path, grid)
        if self._writer is not None:
            self._writer.close()


class RotatingCheckpoint(keras.callbacks.Callback):
    """Saves the whole model (weights, optimizer, replay buffer) as ``epoch_NNNN.keras`` in
    ``directory`` after every epoch, atomically (write to a temporary file, then rename), and
    keeps the last ``keep`` files."""

    PATTERN = re.compile(r"^epoch_(\d+)\.keras$")

    def __init__(self, directory: str, *, keep: int = 3):
        super().__init__()
        if keep < 1:
            raise ValueError(f"`keep` must be >= 1; received {keep!r}")
        self.directory = directory
        self.keep = keep

    def checkpoints(self):
        """Existing checkpoint paths, oldest first."""
        return [path for _, path in numbered_entries(self.directory, self.PATTERN)]

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"epoch_{epoch + 1:04d}.keras")
        check_free_space(self.directory, saved_state_bytes(self.model), path)
        write_atomically(path, self.model.save, suffix=".keras")
        for old in self.checkpoints()[:-self.keep]:
            os.remove(old)


class ChiefBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``keras.callbacks.BackupAndRestore`` for single- and multi-worker training, with exact resume.

    At the end of every epoch the chief writes the full training state (weights, optimizer slots and
    step counter, replay buffer, seed state) to ``backup_dir/epoch_NNNN/`` (written under a temporary
    name and renamed, so a kill never leaves a torn generation) and keeps the last ``keep``
    generations. On a restart every worker restores the newest generation that loads (a truncated or
    corrupt one is reported and skipped) from ``backup_dir``, a directory all workers can read, and
    ``fit`` continues from the saved epoch. Non-chief workers never write. The backup is deleted
    when training completes (``delete_on_completion``), or by :meth:`remove` once the caller has saved the
    final model safely. A generation that fails to load leaves the model as it was (no partial restore).

    Call :meth:`restore` before ``fit`` to learn the epoch to resume from (e.g. to build that epoch's
    data); otherwise ``on_train_begin`` restores.

    Args:
        backup_dir: Directory of the backup.
        is_chief: Whether this process writes the backup. Default True.
        keep: Generations kept. Default 2.
        log: Callable used to report a resume (default ``print``).
        delete_on_completion: Delete the backup when ``fit`` completes. Default True; pass False and call
            :meth:`remove` after the final model is written, so that a kill in between loses nothing.
    """

    PATTERN, WEIGHTS, METADATA = BACKUP_GENERATION, BACKUP_WEIGHTS, BACKUP_METADATA  # jem_tf.run.workdir's layout

    def __init__(self, backup_dir: str, *, is_chief: bool = True, keep: int = 2, log=print,
                 delete_on_completion: bool = True):
        super().__init__(backup_dir, save_freq="epoch", double_checkpoint=False, delete_checkpoint=True)
        if keep < 1:
            raise ValueError(f"`keep` must be >= 1; received {keep!r}")
        self.is_chief = is_chief
        self.keep = keep
        self.log = log
        self.delete_on_completion = delete_on_completion
        self.completed = False
        self.resumed_from_epoch = None
        self._restored = False

    def generations(self):
        """``(epoch, directory)`` of the complete generations, newest first."""
        return numbered_entries(self.backup_dir, self.PATTERN)[::-1]

    def restore(self, model: keras.Model) -> int:
        """Loads the newest loadable generation into ``model``; returns its epoch (0: nothing to resume)."""
        self._restored = True
        if model.optimizer is not None and not model.optimizer.built:
            with model.distribute_strategy.scope():
                model.optimizer.build(model.trainable_variables)
        generations = self.generations()
        # What a failed load must put back: load_weights assigns variable by variable.
        variables = list(model.variables) + (list(model.optimizer.variables) if model.optimizer is not None else [])
        initial = [v.numpy() for v in variables] if generations else []
        for epoch, directory in generations:
            try:
                with open(os.path.join(directory, self.METADATA)) as f:
                    metadata = json.load(f)
                model.load_weights(os.path.join(directory, self.WEIGHTS))
            except Exception as error:  # truncated/corrupt files raise OSError, ValueError, KeyError...
                for variable, value in zip(variables, initial):
                    variable.assign(value)
                self.log(f"Backup {directory} is unreadable ({type(error).__name__}: {str(error)[:200]}); "
                         "trying the previous one.")
                continue
            self.resumed_from_epoch = int(metadata["epoch"])
            set_initial_epoch(model, self.resumed_from_epoch)  # what Keras's BackupAndRestore does
            self.log(f"Resuming from the backup in {directory}: {self.resumed_from_epoch} epoch(s) done, "
                     f"optimizer step {int(model.optimizer.iterations.numpy())}.")
            return self.resumed_from_epoch
        return 0

    def on_train_begin(self, logs=None):
        if not self._restored:
            self.restore(self.model)

    def _save_model(self):
        if not self.is_chief:
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch_{self._current_epoch:04d}"
        target = os.path.join(self.backup_dir, name)

        def write_generation(tmp):
            # A full disk is refused before h5py starts (it can crash the process instead of raising).
            check_free_space(self.backup_dir, saved_state_bytes(self.model), target)
            os.makedirs(tmp)
            self.model.save_weights(os.path.join(tmp, self.WEIGHTS), overwrite=True)
            with open(os.path.join(tmp, self.METADATA), "w") as f:
                json.dump({"epoch": self._current_epoch,
                           "optimizer_step": int(self.model.optimizer.iterations.numpy())}, f)
                f.flush()
                os.fsync(f.fileno())

        # A generation is complete or absent; on a failure the previous generations stay (the last good epoch).
        write_atomically(target, write_generation, replace_directory=True)
        for _, old in self.generations()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def on_train_end(self, logs=None):
        # Kept when training stopped early (e.g. the stability guard gave up), so it can be resumed.
        epochs_done = max(self._current_epoch, self.resumed_from_epoch or 0)
        self.completed = epochs_done >= (self.params or {}).get("epochs", 0) and not self.model.stop_training
        if self.completed and self.delete_on_completion:
            self.remove()

    def remove(self) -> None:
        """Deletes the backup (chief only)."""
        if self.is_chief:
            shutil.rmtree(self.backup_dir, ignore_errors=True)
