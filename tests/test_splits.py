"""jem_tf.run.splits: a run's data and its splits (validation, labelled, held out), derived once."""

import dataclasses

import numpy as np
import pytest

from jem_tf.data import load_dataset, load_digits
from jem_tf.errors import UsageError
from jem_tf.run.config import TrainConfig
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


def test_labelled_selection_is_balanced_seeded_and_disjoint_from_validation():
    data = load_digits(seed=0)
    config = TrainConfig(labels_per_class=10, seed=3)
    train, validation = split_train_validation(config, data.x_train, data.y_train)
    labelled = select_labelled(config, train)
    assert np.bincount(labelled.labels).tolist() == [10] * 10
    np.testing.assert_array_equal(labelled.images, select_labelled(config, train).images)
    assert not np.array_equal(labelled.images, select_labelled(config.replace(seed=4), train).images)
    validation_rows = {row.tobytes() for row in validation.images}
    assert not any(row.tobytes() in validation_rows for row in labelled.images)
    with pytest.raises(ValueError, match="is more than the .* training images of class"):
        select_labelled(config.replace(labels_per_class=1000), train)
    with pytest.raises(ValueError, match="labels_per_class must be"):
        TrainConfig(labels_per_class=0).validate()
