"""A run's data and its splits, derived once: :func:`run_splits` gives the :class:`RunSplits` that training,
tuning, evaluation and export all use.

* :func:`load_run_dataset`: the run's dataset as it saw it (its seed fixes the digits train/test split);
* :func:`split_train_validation`: the one rule that splits the training data into the images the
  model trains on and the validation images it never sees (model selection, temperature scaling and
  the OOD threshold use the latter, so a second rule anywhere would leak training images into them);
* :func:`select_labelled`: a semi-supervised run's labelled images;
* :func:`held_out_split` and :func:`ood_calibration_data`: what evaluation and export hold out.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import numpy as np

from jem_tf.choices import CALIBRATION_SPLITS
from jem_tf.data import ImageDataset, load_dataset, split_validation
from jem_tf.errors import UsageError, as_usage_error
from jem_tf.run.config import TrainConfig
from jem_tf.run.config_rules import check_labels_per_class
from jem_tf.seeds import LABELLED_SUBSET


class Split(NamedTuple):
    """Images and labels of one split."""

    images: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class RunSplits:
    """The splits of a run's dataset, as :func:`run_splits` derives them from the run's config.

    Attributes:
        train: The images the model trains on (every one trains p(x)).
        validation: The images it never trains on (model selection, refinement, temperature scaling, the OOD
            detector), or ``None`` (``validation_fraction=0``, or data that is not the run's).
        labelled: The training images whose labels the run uses: ``train``, or a semi-supervised run's few
            (:func:`select_labelled`). Feature statistics fitted after training must see these labels only.
        test: The dataset's test split.
        semi_supervised: Whether ``labelled`` is a semi-supervised selection (``labels_per_class``).
        class_names: The dataset's class names (an image folder's), or ``None``.
        preprocessing: How the dataset's pixels became the images, when the dataset says (an image folder's).
    """

    train: Split
    validation: Optional[Split]
    labelled: Split
    test: Split
    semi_supervised: bool = False
    class_names: Optional[Tuple[str, ...]] = None
    preprocessing: Optional[str] = None

    def held_out(self) -> Tuple[Split, str]:
        """``(images and labels, name)`` of the split the run did not train on: ``"validation"``, else ``"test"``."""
        return (self.validation, "validation") if self.validation is not None else (self.test, "test")


def load_run_dataset(dataset_name: Optional[str] = None, *, config: Optional[TrainConfig] = None,
                     data_dir: Optional[str] = None, download: bool = False) -> ImageDataset:
    """``dataset_name`` (default: the run's) as the run saw it: with the run's ``config`` and its
    dataset, the run's seed (which fixes the digits train/test split) and data directory (unless
    ``data_dir`` overrides it); any other dataset with seed 0.

    Raises:
        UsageError: the data is missing, unknown or unreadable (a ``.npz`` file's checks included).
    """
    if dataset_name is None:
        if config is None:
            raise ValueError("load_run_dataset needs a dataset name or a run's config.")
        dataset_name = config.dataset
    same_data = config is not None and config.dataset == dataset_name
    with as_usage_error():  # the user's data: jem_tf.data.npz reports a bad file as a plain ValueError
        return load_dataset(dataset_name, data_dir=data_dir or (config.data_dir if same_data else None),
                            download=download, seed=config.seed if same_data else 0,
                            image_size=config.image_size if same_data else None,
                            resize_method=config.resize_method if same_data else "bilinear")


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
        raise UsageError(f"Dataset {config.dataset!r}: cannot split off the validation split "
                         f"(validation_fraction={config.validation_fraction}): {error}; change --validation-fraction "
                         "(0: no validation split) or give more training images.") from error
    return Split(x_train, y_train), Split(x_val, y_val)


def check_training_split(config: TrainConfig, train: Split, *, num_classes: int) -> None:
    """A run's training split must hold images of every one of its ``num_classes`` classes (the largest label + 1),
    and of at least 2: a classifier of one class, or of classes it never sees, trains without error and means
    nothing.

    Raises:
        UsageError: naming the dataset and the classes without training images.
    """
    present = np.unique(train.labels)
    where = "training split" + (" (after the validation split)" if config.validation_fraction > 0 else "")
    if len(present) < 2:
        raise UsageError(f"Dataset {config.dataset!r}: the {where} has images of {len(present)} class(es) "
                         f"({', '.join(str(c) for c in present) or 'none'}); a JEM needs at least 2 classes.")
    missing = sorted(set(range(num_classes)) - {int(c) for c in present})
    if missing:
        shown = ", ".join(str(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise UsageError(f"Dataset {config.dataset!r}: class(es) {shown} of {num_classes} (class ids 0..the largest "
                         f"label) have no images in the {where}; label the classes 0..K-1, each with training "
                         "images.")


def select_labelled(config: TrainConfig, train: Split) -> Split:
    """The labelled part of a semi-supervised run's training split: ``config.labels_per_class`` images of each
    class, drawn without replacement, seeded by ``config.seed`` (balanced and reproducible). The validation
    split is separate (:func:`split_train_validation`) and keeps all its labels.

    Raises:
        UsageError: ``labels_per_class`` exceeds the smallest class of the training split
            (:func:`jem_tf.run.config_rules.check_labels_per_class`).
    """
    classes, counts = np.unique(train.labels, return_counts=True)
    check_labels_per_class(config, dict(zip(classes, counts)))
    rng = np.random.default_rng([config.seed, LABELLED_SUBSET])
    chosen = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), size=config.labels_per_class,
                                        replace=False) for c in classes])
    chosen.sort()
    return Split(train.images[chosen], train.labels[chosen])


def labelled_training_split(config: TrainConfig, train: Split) -> Split:
    """The training images whose labels the run used: all of ``train``, or a semi-supervised run's labelled
    part (:func:`select_labelled`). Feature statistics fitted after training must see these labels only."""
    return train if config.labels_per_class is None else select_labelled(config, train)


def run_splits(config: TrainConfig, data: ImageDataset) -> RunSplits:
    """The splits of ``data`` (the run's dataset, :func:`load_run_dataset`) that a run with ``config`` uses:
    :func:`split_train_validation`, checked by :func:`check_training_split`, then the labelled images.

    Raises:
        UsageError: the data cannot be split as the config says (naming the dataset and the value).
    """
    train, validation = split_train_validation(config, data.x_train, data.y_train)
    check_training_split(config, train, num_classes=data.num_classes)
    # Semi-supervised: the few labelled images (validation keeps all its labels; every training image trains p(x)).
    labelled = labelled_training_split(config, train)
    return RunSplits(train, validation, labelled, Split(data.x_test, data.y_test),
                     semi_supervised=config.labels_per_class is not None, class_names=data.class_names,
                     preprocessing=data.preprocessing)


def dataset_splits(dataset_name: str, *, config: Optional[TrainConfig], data: ImageDataset) -> RunSplits:
    """The splits of ``data`` (dataset ``dataset_name``) for a trained model: the run's (:func:`run_splits`) when
    ``config`` is its run's and names that dataset; otherwise (another dataset, or a bare ``.keras`` file) all of
    its training images, labelled, and no validation split."""
    if config is not None and config.dataset == dataset_name:
        return run_splits(config, data)
    train = Split(data.x_train, data.y_train)
    return RunSplits(train, None, train, Split(data.x_test, data.y_test), class_names=data.class_names,
                     preprocessing=data.preprocessing)


def held_out_split(dataset_name: str, *, config: Optional[TrainConfig] = None, data_dir: Optional[str] = None,
                   data: Optional[ImageDataset] = None) -> Tuple[np.ndarray, np.ndarray, str]:
    """In-distribution images and labels that the run did not train on, and which split they are.

    With the run's ``config`` and its dataset, that is the run's validation split
    (:func:`split_train_validation`); otherwise, or when the run had no validation split, the dataset's
    test split. ``data``: the already loaded :func:`load_run_dataset` (loaded here when ``None``).
    """
    if data is None:
        data = load_run_dataset(dataset_name, config=config, data_dir=data_dir)
    (images, labels), name = dataset_splits(dataset_name, config=config, data=data).held_out()
    return images, labels, name




def ood_calibration_data(dataset_name: str, *, config: Optional[TrainConfig], data: ImageDataset,
                         calibration_split: str = "validation") -> Tuple[Split, Split]:
    """``(calibration, train)``: the in-distribution images an OOD detector is selected and calibrated on,
    and the training images for its feature statistics (only the labels the run trained with).

    ``calibration_split="validation"`` (the default) is the run's validation split, and an error when the
    run has none (``validation_fraction=0``, another dataset, or a bare ``.keras`` file without its run):
    never silently the test split. ``"test"`` uses the test split, explicitly (OOD numbers measured on
    that split afterwards are then not independent of the calibration).
    """
    if calibration_split not in CALIBRATION_SPLITS:
        raise UsageError(f"calibration_split must be one of {CALIBRATION_SPLITS}; received {calibration_split!r}")
    splits = dataset_splits(dataset_name, config=config, data=data)
    if calibration_split == "test":
        return splits.test, splits.labelled
    if splits.validation is None:
        own_run = config is not None and config.dataset == dataset_name
        why = ("the run has no validation split (validation_fraction=0)" if own_run else
               "there is no run config for this dataset (a bare .keras file or another dataset)")
        raise UsageError(f"Cannot calibrate the OOD detector on a validation split: {why}. Calibrating on the test "
                         "split must be asked for explicitly (--calibration-split test), and its OOD numbers are "
                         "then not independent of the calibration.")
    return splits.validation, splits.labelled
