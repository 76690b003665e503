"""Trained models read back from files: a run's JEM (:func:`load_trained_model`, for ``evaluate`` and
``export``) and a classifier to convert (:func:`load_classifier`, for ``--init-from``), each from a training work
directory or a ``.keras`` file, with one-line errors naming the path."""

from __future__ import annotations

import os
import zipfile
from typing import NamedTuple, Optional, Tuple

import keras
import numpy as np

from jem_tf.errors import UsageError
from jem_tf.files import file_sha256, zip_member_is_forged
from jem_tf.metrics import fit_temperature
from jem_tf.model.conversion import check_logits, logits_network, mean_energy
from jem_tf.model.heads import with_temperature
from jem_tf.model.jem import JEM
from jem_tf.model.views import views_of, with_test_time_augmentation, without_test_time_augmentation
from jem_tf.run.config import TrainConfig
from jem_tf.run.workdir import RunLayout, load_run_config

# Bounds on what a .keras archive may inflate to, checked from its zip directory before anything is read: Keras
# stores members uncompressed, and a model's config.json is kilobytes; a small file that declares gigabytes (a
# zip bomb) is refused instead of filling the memory.
ARCHIVE_JSON_MAX_BYTES = 64 << 20
ARCHIVE_MIN_TOTAL_BYTES = 256 << 20  # the total may always reach this, or ARCHIVE_MAX_RATIO x the file's size
ARCHIVE_MAX_RATIO = 64


def check_keras_archive(path: str) -> None:
    """``UsageError`` naming ``path`` unless it is a zip archive whose members' declared sizes are possible and
    bounded (each JSON member, and the total, see the constants above); reads only the zip directory."""
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path!r} is not a .keras archive (truncated or corrupt: not a zip file).")
    file_bytes = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise UsageError(f"{path!r} is not a readable .keras archive ({error}).") from error
    for info in members:
        if zip_member_is_forged(info, file_bytes):
            raise UsageError(f"{path!r} is truncated or corrupt: its member {info.filename!r} claims "
                             f"{info.file_size:,} bytes from {info.compress_size:,} stored bytes in a file of "
                             f"{file_bytes:,} bytes.")
        if info.filename.endswith(".json") and info.file_size > ARCHIVE_JSON_MAX_BYTES:
            raise UsageError(f"{path!r}: its member {info.filename!r} inflates to {info.file_size:,} bytes (at most "
                             f"{ARCHIVE_JSON_MAX_BYTES:,} are read: a model's config is kilobytes).")
    total, limit = sum(info.file_size for info in members), max(ARCHIVE_MIN_TOTAL_BYTES, ARCHIVE_MAX_RATIO * file_bytes)
    if total > limit:
        raise UsageError(f"{path!r} inflates to {total:,} bytes from a file of {file_bytes:,} bytes (at most "
                         f"{limit:,}: Keras stores a model's members uncompressed).")


def load_keras_archive(path: str, what: str, *, compile: bool = True) -> keras.Model:
    """``keras.models.load_model(path, compile=compile)`` (``safe_mode``: no code from the file) with one-line
    errors, after :func:`check_keras_archive`."""
    check_keras_archive(path)
    try:
        return keras.models.load_model(path, compile=compile)
    except (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile) as error:  # corrupt or foreign
        raise UsageError(f"Cannot load {path!r} as {what}: {error}") from error


def load_trained_model(model_path: str) -> Tuple[JEM, Optional[TrainConfig]]:
    """``(model, config)`` from a training work directory, or ``(model, None)`` from a ``.keras`` file.

    Raises:
        UsageError: nothing loadable at ``model_path``, or the file holds something other than a JEM.
    """
    config = None
    if os.path.isdir(model_path):
        config = load_run_config(model_path)
        model_path = RunLayout(model_path).model
    if not os.path.isfile(model_path):
        raise UsageError(f"No model at {model_path!r} (expected a .keras file or a training work directory).")
    model = load_keras_archive(model_path, "a JEM .keras file")
    if not isinstance(model, JEM):
        raise UsageError(f"{model_path!r} holds a {type(model).__name__}, not a jem_tf.JEM.")
    return model, config


class ClassifierSource(NamedTuple):
    """A trained classifier to convert (``--init-from``): its logits network and where it came from."""

    network: keras.Model  # float32 logits network (jem_tf.model.conversion.logits_network)
    path: str  # the .keras file read (a work directory's model.keras)
    sha256: str
    kind: str  # "jem-tf model" (its backbone) or "keras classifier"
    changes: Tuple[str, ...]  # what was changed to get logits (empty: none)
    test_time_augmentation: str = "none"  # the views the source averaged over (its network is the single view)
    temperature: float = 1.0  # what its logits were divided by (with_validation_temperature)

    def record(self) -> dict:
        """The source as ``metrics.json`` records it."""
        return {"path": os.path.abspath(self.path), "sha256": self.sha256, "kind": self.kind,
                "changes": list(self.changes), "temperature": self.temperature}


def with_energy_l2_center(config: TrainConfig, source: Optional[ClassifierSource], images: np.ndarray) -> TrainConfig:
    """``config`` with ``energy_l2_center`` measured when it is unset for a conversion: the source classifier's mean
    energy on the training ``images`` (:func:`jem_tf.model.conversion.mean_energy`), so that the L2 term pulls energies
    towards where the classifier has them, not towards an arbitrary 0 (with a ``density_temperature``, the energies
    of its logits divided by that). Unchanged otherwise (0 is used)."""
    if source is None or config.energy_l2_center is not None:
        return config
    network = source.network if config.density_temperature == 1 else with_temperature(
        source.network, config.density_temperature)
    return config.replace(energy_l2_center=mean_energy(network, images))


def calibrates_source(config: TrainConfig) -> bool:
    """Whether ``temperature_scaling`` is fitted to the source classifier before training (a frozen classifier under
    a density head: its ``p(y|x)`` does not change) rather than to the trained model."""
    return bool(config.temperature_scaling and config.init_from is not None and config.density_head
                and not config.density_head_finetune)


def with_validation_temperature(config: TrainConfig, source: Optional[ClassifierSource], validation
                                ) -> Optional[ClassifierSource]:
    """``source`` with its logits divided by the temperature that minimises their NLL on the run's ``validation``
    split (:class:`jem_tf.run.splits.Split`; :func:`jem_tf.metrics.fit_temperature`,
    :func:`jem_tf.model.heads.with_temperature`) when ``config.temperature_scaling`` is on and a frozen
    classifier's density head will train on it (:func:`calibrates_source`); unchanged otherwise (the config rules
    require a validation split for it)."""
    if source is None or not calibrates_source(config):
        return source
    logits = source.network.predict(validation.images, batch_size=256, verbose=0).astype(np.float64)
    temperature = fit_temperature(logits, validation.labels)
    return source._replace(network=with_temperature(source.network, temperature), temperature=temperature)


def classifier_file(path: str) -> str:
    """The ``.keras`` file ``--init-from PATH`` names: ``PATH`` or, for a training work directory, its
    ``model.keras``. ``UsageError`` naming the path when there is none."""
    if os.path.isdir(path):
        model = RunLayout(path).model
        if not os.path.isfile(model):
            raise UsageError(f"--init-from {path!r} is a directory without a trained model ({model} does not exist: "
                             "is its training finished?).")
        return model
    if not os.path.exists(path):
        if os.path.islink(path):
            raise UsageError(f"--init-from {path!r} is a symbolic link that leads nowhere (a loop, or a missing "
                             "target).")
        raise UsageError(f"--init-from {path!r} does not exist.")
    if not os.path.isfile(path):
        raise UsageError(f"--init-from {path!r} is not a regular file.")
    return path


def load_classifier(path: str, *, image_shape, num_classes: int, sha256: Optional[str] = None,
                    images: Optional[np.ndarray] = None) -> ClassifierSource:
    """The trained classifier at ``path`` (a training work directory or a ``.keras`` file holding a jem-tf model,
    whose backbone is taken, or any Keras classifier) as a float32 logits network for a JEM of ``image_shape``
    images and ``num_classes`` classes (:func:`jem_tf.model.conversion.logits_network`).

    Raises:
        UsageError: one line naming the path: missing or unreadable file, another file than ``sha256`` pins,
            not a classifier, or another image shape or class count; with ``images`` (the run's training
            images), outputs that are probabilities whatever the layers say
            (:func:`jem_tf.model.conversion.check_logits`).
    """
    file = classifier_file(path)
    digest = file_sha256(file)
    if sha256 is not None and digest != sha256:
        raise UsageError(f"--init-from {file!r} has SHA-256 {digest}, not the {sha256} of init_from_sha256 (the file "
                         "changed, or another file was given).")
    model = load_keras_archive(file, "a Keras classifier", compile=False)  # its loss and optimizer are not used
    kind = "keras classifier"
    if isinstance(model, JEM):
        model, kind = model.backbone, "jem-tf model"
    views = views_of(model)
    try:
        # A fine-tune trains the single-view network (its run's test_time_augmentation wraps it again at the end).
        model = without_test_time_augmentation(model)
        network, changes = logits_network(model, image_shape=image_shape, num_classes=num_classes)
        if views != "none":
            changes = [f"took the single-view network out of its {views!r} test-time augmentation"] + changes
        if images is not None:
            check_logits(network, images)
    except ValueError as error:
        raise UsageError(f"--init-from {file!r}: {error}") from error
    return ClassifierSource(network, file, digest, kind, tuple(changes), views)


def source_classifier_network(config: Optional[TrainConfig], *, image_shape, num_classes: int,
                              log=print) -> Optional[keras.Model]:
    """The logits network of the classifier a conversion run started from, as it was before the fine-tune
    (``config.init_from``, checked against ``init_from_sha256``): the OOD detector's ``source_`` candidates
    (:mod:`jem_tf.ood.detectors`). ``None`` for a run that converted nothing, or, with one line through ``log``,
    when the file is gone or has changed (the detector is then chosen among the model's own candidates)."""
    if config is None or config.init_from is None:
        return None
    try:
        source = load_classifier(config.init_from, image_shape=image_shape, num_classes=num_classes,
                                 sha256=config.init_from_sha256)
        return with_test_time_augmentation(source.network, source.test_time_augmentation)
    except UsageError as error:
        if log is not None:
            log(f"OOD detector: the source classifier's candidates are left out: {error}")
        return None
