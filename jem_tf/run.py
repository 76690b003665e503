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
import json
import os
from typing import NamedTuple, Optional, Tuple

import keras
import numpy as np

from jem_tf.config import TrainConfig
from jem_tf.data import ImageDataset, load_dataset, split_validation
from jem_tf.jem import JEM


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The files of a work directory ``workdir``.

    * ``model.keras``: the final model (weights, optimizer, replay buffer);
    * ``config.json``: the run's :class:`TrainConfig`; ``metrics.json``: its final metrics;
    * ``samples.png``: replay-buffer samples at the end;
    * ``checkpoints/``: the last epochs' ``.keras`` files; ``logs/``: TensorBoard;
    * ``backup/``: the training state of the last finished epoch while training runs (resumption);
    * ``precision.json``: the choice of ``precision="auto"`` (a resumed run reuses it).
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
    (x_train, y_train), (x_val, y_val) = split_validation(images, labels, fraction=config.validation_fraction,
                                                          seed=config.seed)
    return Split(x_train, y_train), Split(x_val, y_val)


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
    """The :class:`TrainConfig` a work directory's ``config.json`` holds, or ``None`` without one."""
    path = RunLayout(workdir).config
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return TrainConfig().replace(**json.load(f))


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
    try:
        model = keras.models.load_model(model_path)  # safe_mode=True: no arbitrary code from the file
    except Exception as error:  # corrupt or foreign files raise many types
        raise ValueError(f"Cannot load {model_path!r} as a JEM .keras file: {error}") from error
    if not isinstance(model, JEM):
        raise ValueError(f"{model_path!r} holds a {type(model).__name__}, not a jem_tf.JEM.")
    return model, config
