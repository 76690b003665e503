"""Keras callbacks for JEM training: sample grids and atomic, rotating checkpoints."""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from jem_tf.visualize import image_grid, upscale, write_png


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
        found = []
        for path in glob.glob(os.path.join(self.directory, "epoch_*.keras")):
            match = self.PATTERN.match(os.path.basename(path))
            if match:
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"epoch_{epoch + 1:04d}.keras")
        tmp = os.path.join(self.directory, f".epoch_{epoch + 1:04d}.tmp.keras")
        self.model.save(tmp)
        os.replace(tmp, path)
        for old in self.checkpoints()[:-self.keep]:
            os.remove(old)


class ChiefBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``keras.callbacks.BackupAndRestore`` for single- and multi-worker training.

    At the end of every epoch the chief writes the training state (weights, optimizer slots, replay
    buffer, epoch) to ``backup_dir``, each file written to a temporary name and renamed into place;
    on a restart every worker restores the same state from ``backup_dir`` (a directory all workers
    can read, as for Keras's own multi-worker backups) and ``fit`` continues from the saved epoch.
    Non-chief workers never write, so workers cannot overwrite each other's files. The backup is
    deleted when training completes.

    Args:
        backup_dir: Directory of the backup.
        is_chief: Whether this process writes the backup. Default True.
        log: Callable used to report a resume (default ``print``).
    """

    def __init__(self, backup_dir: str, *, is_chief: bool = True, log=print):
        super().__init__(backup_dir, save_freq="epoch", double_checkpoint=False, delete_checkpoint=True)
        self.is_chief = is_chief
        self.log = log
        self.resumed_from_epoch = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        epoch = getattr(self.model, "_initial_epoch", None)
        if epoch:
            self.resumed_from_epoch = int(epoch)
            self.log(f"Resuming from the backup in {self.backup_dir}: {epoch} epoch(s) done, optimizer "
                     f"step {int(self.model.optimizer.iterations.numpy())}.")

    def _save_model(self):
        if not self.is_chief:
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp_weights = os.path.join(self.backup_dir, ".tmp.weights.h5")
        self.model.save_weights(tmp_weights, overwrite=True)
        tmp_metadata = os.path.join(self.backup_dir, ".tmp.training_metadata.json")
        with open(tmp_metadata, "w") as f:
            json.dump({"epoch": self._current_epoch, "batch": self._last_batch_seen}, f)
        os.replace(tmp_weights, self._weights_path)
        os.replace(tmp_metadata, self._training_metadata_path)

    def on_train_end(self, logs=None):
        if self.is_chief:
            super().on_train_end(logs)
