"""A training work directory (``python -m jem_tf.train --workdir``): its file names, loading the trained
model with its config, and the held-out split the run did not train on."""

from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import keras
import numpy as np

from jem_tf.config import TrainConfig
from jem_tf.data import ImageDataset, load_dataset, split_validation
from jem_tf.jem import JEM

MODEL_FILE = "model.keras"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.png"


def load_trained_model(model_path: str) -> Tuple[JEM, Optional[TrainConfig]]:
    """``(model, config)`` from a training work directory, or ``(model, None)`` from a ``.keras`` file.

    Raises:
        ValueError: nothing loadable at ``model_path``, or the file holds something other than a JEM.
    """
    config = None
    if os.path.isdir(model_path):
        config_path = os.path.join(model_path, CONFIG_FILE)
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = TrainConfig().replace(**json.load(f))
        model_path = os.path.join(model_path, MODEL_FILE)
    if not os.path.isfile(model_path):
        raise ValueError(f"No model at {model_path!r} (expected a .keras file or a training work directory).")
    try:
        model = keras.models.load_model(model_path)  # safe_mode=True: no arbitrary code from the file
    except Exception as error:  # corrupt or foreign files raise many types
        raise ValueError(f"Cannot load {model_path!r} as a JEM .keras file: {error}") from error
    if not isinstance(model, JEM):
        raise ValueError(f"{model_path!r} holds a {type(model).__name__}, not a jem_tf.JEM.")
    return model, config


def load_run_dataset(dataset_name: str, *, config: Optional[TrainConfig] = None,
                     data_dir: Optional[str] = None) -> ImageDataset:
    """``dataset_name`` as the run saw it: with the run's ``config`` and its dataset, the run's seed (which
    fixes the digits train/test split) and data directory (unless ``data_dir`` overrides it)."""
    same_data = config is not None and config.dataset == dataset_name
    return load_dataset(dataset_name, data_dir=data_dir or (config.data_dir if same_data else None),
                        seed=config.seed if same_data else 0)


def held_out_split(dataset_name: str, *, config: Optional[TrainConfig] = None, data_dir: Optional[str] = None,
                   data: Optional[ImageDataset] = None) -> Tuple[np.ndarray, np.ndarray, str]:
    """In-distribution images and labels that the run did not train on, and which split they are.

    With the run's ``config`` and its dataset, that is the run's validation split (same seed and fraction
    as training); otherwise, or when the run had no validation split, the dataset's test split. ``data``:
    the already loaded :func:`load_run_dataset` (loaded here when ``None``).
    """
    if data is None:
        data = load_run_dataset(dataset_name, config=config, data_dir=data_dir)
    if config is not None and config.dataset == dataset_name and config.validation_fraction > 0:
        _, (x_val, y_val) = split_validation(data.x_train, data.y_train, fraction=config.validation_fraction,
                                             seed=config.seed)
        return x_val, y_val, "validation"
    return data.x_test, data.y_test, "test"
