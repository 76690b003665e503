"""A run's layout, dataset and splits (jem_tf.run.workdir, jem_tf.run.splits, jem_tf.run.model_files): one rule, used
by training, tuning, evaluation and export."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from jem_tf.data import load_dataset
from jem_tf.errors import UsageError
from jem_tf.run.config import TrainConfig
from jem_tf.run.model_files import load_trained_model
from jem_tf.run.splits import (
    RunSplits,
    dataset_splits,
    held_out_split,
    load_run_dataset,
    ood_calibration_data,
    run_splits,
    select_labelled,
    split_train_validation,
)
from jem_tf.run.workdir import RunLayout, load_run_config, load_run_metrics


def test_layout_names_every_file_of_a_work_directory(tmp_path):
    layout = RunLayout(str(tmp_path))
    paths = (layout.model, layout.config, layout.metrics, layout.samples, layout.checkpoints, layout.logs,
             layout.backup, layout.precision)
    assert [os.path.relpath(p, tmp_path) for p in paths] == \
        ["model.keras", "config.json", "metrics.json", "samples.png", "checkpoints", "logs", "backup", "precision.json"]


def test_auto_precision_is_probed_once_per_run_and_reused_on_resume(tmp_path):
    from jem_tf.training.pipeline import resolve_run_precision

    layout = RunLayout(str(tmp_path))
    config = TrainConfig(precision="auto", width=4)
    messages = []
    resolved, report = resolve_run_precision(config, layout, image_shape=(8, 8, 1), num_classes=10, batch_size=8,
                                             log=messages.append)
    assert resolved.precision in ("float32", "mixed_bfloat16") and "measured probe" in report["reason"]
    with open(layout.precision) as f:
        assert json.load(f)["precision"] == resolved.precision
    # A resumed run (a backup exists) takes the recorded choice without probing, whatever it was.
    recorded = {"precision": "mixed_bfloat16", "reason": "probe said so"}
    with open(layout.precision, "w") as f:
        json.dump(recorded, f)
    os.makedirs(layout.backup)
    messages.clear()
    resolved, report = resolve_run_precision(config, layout, image_shape=(8, 8, 1), num_classes=10, batch_size=8,
                                             log=messages.append)
    assert resolved.precision == "mixed_bfloat16" and "reused on resume" in report["reason"]
    assert messages == ["precision auto -> mixed_bfloat16: the choice of the run being resumed"]
    # An explicit precision is never replaced.
    assert resolve_run_precision(config.replace(precision="float32"), layout, image_shape=(8, 8, 1), num_classes=10,
                                 batch_size=8)[0].precision == "float32"


def test_split_is_seeded_stratified_disjoint_and_off_without_a_fraction():
    data = load_dataset("digits", seed=0)
    config = TrainConfig(validation_fraction=0.2, seed=3)
    train, validation = split_train_validation(config, data.x_train, data.y_train)
    again, validation_again = split_train_validation(config, data.x_train, data.y_train)
    np.testing.assert_array_equal(validation.images, validation_again.images)
    assert len(train.images) + len(validation.images) == len(data.x_train)
    assert len(validation.images) == pytest.approx(0.2 * len(data.x_train), abs=1)
    # Disjoint: no validation image is also a training image.
    train_rows = {row.tobytes() for row in train.images}
    assert not any(row.tobytes() in train_rows for row in validation.images)
    # Stratified: every class keeps its share.
    shares = np.bincount(validation.labels, minlength=10) / np.bincount(data.y_train, minlength=10)
    assert np.all(np.abs(shares - 0.2) < 0.05)
    other, _ = split_train_validation(config.replace(seed=4), data.x_train, data.y_train)
    assert not np.array_equal(other.images, train.images)
    whole, none = split_train_validation(config.replace(validation_fraction=0.0), data.x_train, data.y_train)
    assert none is None and whole.images is data.x_train


def test_evaluation_export_and_tuning_hold_out_the_split_training_never_saw():
    from jem_tf.training.tuning import build_hypermodel

    config = TrainConfig(dataset="digits", validation_fraction=0.1, seed=1, precision="float32")
    data = load_run_dataset(config=config)
    train, validation = split_train_validation(config, data.x_train, data.y_train)
    x_val, y_val, split = held_out_split("digits", config=config)
    assert split == "validation"
    np.testing.assert_array_equal(x_val, validation.images)
    np.testing.assert_array_equal(y_val, validation.labels)
    hypermodel = build_hypermodel(config, data)
    np.testing.assert_array_equal(hypermodel.validation.images, validation.images)
    np.testing.assert_array_equal(hypermodel.train.images, train.images)
    # No validation split, or another dataset: the test split (never training images).
    x, _, split = held_out_split("digits", config=config.replace(validation_fraction=0.0))
    assert split == "test" and len(x) == len(data.x_test)
    _, _, split = held_out_split("digits", config=None)
    assert split == "test"


def test_run_dataset_uses_the_runs_seed_for_its_own_dataset_only():
    config = TrainConfig(dataset="digits", seed=5)
    np.testing.assert_array_equal(load_run_dataset(config=config).x_test, load_dataset("digits", seed=5).x_test)
    np.testing.assert_array_equal(load_run_dataset("digits").x_test, load_dataset("digits", seed=0).x_test)
    with pytest.raises(ValueError, match="dataset name or a run's config"):
        load_run_dataset()


def test_load_trained_model_reads_the_layout_and_names_what_is_wrong(tmp_path):
    from conftest import tiny_jem

    layout = RunLayout(str(tmp_path / "run"))
    os.makedirs(layout.workdir)
    with pytest.raises(ValueError, match="No model at"):
        load_trained_model(layout.workdir)
    tiny_jem().save(layout.model)
    with open(layout.config, "w") as f:
        json.dump(TrainConfig(epochs=3).to_dict(), f)
    model, config = load_trained_model(layout.workdir)
    assert config == TrainConfig(epochs=3) == load_run_config(layout.workdir)
    assert model.num_classes == 3
    model, config = load_trained_model(layout.model)
    assert config is None
    plain = tmp_path / "plain.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(plain)
    with pytest.raises(ValueError, match="not a jem_tf.JEM"):
        load_trained_model(str(plain))


def test_load_run_metrics_reads_a_finished_run_and_names_a_bad_file(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    assert load_run_metrics(layout.workdir) is None  # no run, or one that has not finished
    os.makedirs(layout.workdir)
    with open(layout.metrics, "w") as f:
        json.dump({"test_accuracy": 0.5, "train_seconds": 12.0}, f)
    assert load_run_metrics(layout.workdir) == {"test_accuracy": 0.5, "train_seconds": 12.0}
    for text in ("[1, 2]", "{broken"):
        with open(layout.metrics, "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match="metrics.json is not a valid metrics file"):
            load_run_metrics(layout.workdir)


def test_run_splits_are_derived_once_for_every_consumer():
    config = TrainConfig(dataset="digits", validation_fraction=0.1, seed=2, labels_per_class=3)
    data = load_run_dataset(config=config)
    splits = run_splits(config, data)
    train, validation = split_train_validation(config, data.x_train, data.y_train)
    np.testing.assert_array_equal(splits.train.images, train.images)
    np.testing.assert_array_equal(splits.validation.labels, validation.labels)
    np.testing.assert_array_equal(splits.labelled.images, select_labelled(config, train).images)
    assert splits.semi_supervised and len(splits.labelled.images) == 30
    assert splits.test.images is data.x_test and splits.held_out()[1] == "validation"
    with pytest.raises(dataclasses.FrozenInstanceError):
        splits.train = None
    # Export calibrates on the validation split with the statistics of the labels the run used; evaluation holds
    # out the same validation split.
    calibration, known = ood_calibration_data("digits", config=config, data=data)
    np.testing.assert_array_equal(calibration.images, validation.images)
    np.testing.assert_array_equal(known.labels, splits.labelled.labels)
    np.testing.assert_array_equal(held_out_split("digits", config=config, data=data)[0], validation.images)

    supervised = run_splits(config.replace(labels_per_class=None), data)
    assert not supervised.semi_supervised and supervised.labelled is supervised.train
    # Data that is not the run's (or no run config): all its training images, no validation split.
    other = dataset_splits("digits", config=None, data=data)
    assert isinstance(other, RunSplits) and other.validation is None and other.held_out()[1] == "test"
    assert other.labelled.images is data.x_train
    with pytest.raises(UsageError, match="Cannot calibrate the OOD detector on a validation split: there is no run "
                                         "config"):
        ood_calibration_data("digits", config=None, data=data)
    with pytest.raises(UsageError, match=r"labels_per_class \(200\) is more than the"):
        run_splits(config.replace(labels_per_class=200), data)
