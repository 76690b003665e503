"""Writing an export: :func:`export_saved_model` (TF Serving's ``EXPORT_DIR/<version>/`` layout, written to a
temporary directory and renamed) and its metadata (see :mod:`jem_tf.serving`)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import time
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from jem_tf.choices import DEFAULT_MAX_BATCH_SIZE
from jem_tf.data.base import reads_uint8_pixels
from jem_tf.errors import UsageError
from jem_tf.files import TEMPORARY, remove_stale_temporaries, write_atomically
from jem_tf.model.jem import JEM
from jem_tf.networks import compute_precision
from jem_tf.ood import FittedDetector, OODScorer, fit_ood_detector, single
from jem_tf.serving.limits import check_max_batch_size, sample_limits
from jem_tf.serving.signatures import build_serving_module, check_class_names, serving_model
from jem_tf.serving.warmup import WARMUP_FILE, warmup_requests, write_warmup_requests
from jem_tf.version import __version__

METADATA_FILE = os.path.join("assets.extra", "jem_metadata.json")
# An export is written to EXPORT_DIR/.VERSION.tmp-HOST-PID (files.temporary_path) and renamed when complete. The
# names of older jem-tf versions' temporaries, removed the same way: .tmp-VERSION-PID, .tmp-export-HOST-PID.
_OLD_EXPORT_TMP = (re.compile(r"^\.tmp-\d+-(?P<pid>\d+)$"), re.compile(r"^\.tmp-export-(?P<host>[^/]+)-(?P<pid>\d+)$"))


def next_version(export_dir: str) -> int:
    """1 + the largest integer version directory under ``export_dir`` (1 if there is none)."""
    if not os.path.isdir(export_dir):
        return 1
    versions = [int(name) for name in os.listdir(export_dir) if name.isdigit()]
    return max(versions, default=0) + 1


def export_saved_model(model: JEM, export_dir: str, *, version: Optional[int] = None,
                       ood: Optional[FittedDetector] = None, calibration_images: Optional[np.ndarray] = None,
                       calibration_split: str = "given", ood_threshold: Optional[float] = None,
                       tpr: float = 0.95, max_num_samples: int = 256, max_n_steps: int = 1000,
                       max_step_size: Optional[float] = None, max_noise_std: Optional[float] = None,
                       preprocessing: str = "", dataset: str = "",
                       max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                       class_names: Optional[Sequence[str]] = None, serving_precision: str = "float32") -> str:
    """Exports ``model`` for TensorFlow Serving to ``export_dir/<version>/`` and returns that path.

    Args:
        model: A trained :class:`JEM`.
        export_dir: TF Serving's model base path (the directory of versions).
        version: Integer version (default: next free). An existing version is never overwritten.
        ood: The OOD detector to carry (:func:`jem_tf.ood.fit_ood_detector`: chosen on the validation split
            and outliers made from it, with the training split's feature statistics).
        calibration_images: Instead of ``ood``: held-out in-distribution images; the detector is chosen
            among the candidates that need no training data (:func:`jem_tf.ood.select_detector`) and
            calibrated on them.
        calibration_split: Where ``calibration_images`` come from (recorded in the metadata).
        ood_threshold: Instead of ``ood``: the detector is ``log_px`` with this explicit threshold.
        tpr: Fraction of calibration images called in-distribution. Default 0.95.
        max_num_samples, max_n_steps, max_step_size, max_noise_std: Hard upper bounds of the ``sample``
            signature (:func:`build_serving_module`). Defaults 256 (at most 1 GiB of float32 samples), 1000 (at most
            100,000), 10x the trained step size, ``max(10x the trained noise_std, value range width)``.
        max_batch_size: The most images a ``classify`` or ``energy`` request may hold (default 1024; see
            :func:`build_serving_module`); recorded in the metadata.
        preprocessing: How raw inputs map to the model's value range (recorded in the metadata).
        dataset: Name of the training data (recorded in the metadata).
        class_names: The name of each class (recorded in the metadata; ``classify`` returns
            ``predicted_class_name``), or ``None``.
        serving_precision: ``"float32"`` (default: the graph computes in float32 whatever the training
            precision; see :func:`serving_model`) or ``"trained"``. Pass the trained ``model`` (the metadata records
            its precision); an ``ood`` is moved to the served network with its threshold unchanged, so fit it on
            ``serving_model(model)`` to calibrate on the served scores, as ``python -m jem_tf.export`` does.

    Example:
        >>> path = export_saved_model(model, "/models/jem", calibration_images=x_val)
    """
    if not isinstance(model, JEM):
        raise ValueError(f"`model` must be a jem_tf.JEM; received {type(model).__name__}")
    if sum(x is not None for x in (ood, calibration_images, ood_threshold)) != 1:
        raise ValueError("Pass exactly one of `ood`, `calibration_images` and `ood_threshold`.")
    training_precision = compute_precision(model.backbone)
    model = serving_model(model, serving_precision)
    if ood is not None and ood.scorer.backbone is not model.backbone:
        ood = dataclasses.replace(ood, scorer=ood.scorer.with_backbone(model.backbone))
    chosen = version is None  # the next free version: another export may take it first (see below)
    if chosen:
        version = next_version(export_dir)
    if not (isinstance(version, int) and version >= 0):
        raise ValueError(f"`version` must be an int >= 0; received {version!r}")
    target = os.path.join(export_dir, str(version))
    if os.path.exists(target):
        raise ValueError(f"Version {version} already exists at {target!r}; versions are never overwritten.")
    limits = sample_limits(model, max_num_samples=max_num_samples, max_n_steps=max_n_steps,
                           max_step_size=max_step_size, max_noise_std=max_noise_std)  # before the calibration
    check_max_batch_size(model, max_batch_size)
    class_names = check_class_names(class_names, model.num_classes)
    if calibration_images is not None:
        ood = fit_ood_detector(model, calibration_images, calibration_split=calibration_split, tpr=tpr)
    elif ood_threshold is not None:
        if not np.isfinite(ood_threshold):
            raise ValueError(f"`ood_threshold` must be finite; received {ood_threshold!r}")
        detector = single("log_px")
        ood = FittedDetector(OODScorer(model.backbone, value_range=model.value_range),
                             dataclasses.replace(detector, threshold=float(ood_threshold)),
                             {"calibration_split": "none (explicit threshold)", "num_calibration_images": 0,
                              "tpr": None})
    # 8-bit images scaled by x / 127.5 - 1: a classify_uint8 signature takes the raw pixels.
    uint8_inputs = reads_uint8_pixels(preprocessing) and tuple(model.value_range) == (-1.0, 1.0)
    module, signatures = build_serving_module(model, ood=ood, max_batch_size=max_batch_size, class_names=class_names,
                                              uint8_inputs=uint8_inputs, **limits)
    os.makedirs(export_dir, exist_ok=True)
    # Temporaries of exports killed mid-write (this host's dead processes) go; then ours is written.
    remove_stale_temporaries(export_dir, TEMPORARY, *_OLD_EXPORT_TMP)
    low, high = model.value_range
    metadata = {
        "format": "jem-tf SavedModel for TensorFlow Serving",
        "jem_tf_version": __version__,
        "tensorflow_version": tf.__version__,
        "exported_at_unix": int(time.time()),
        "version": version,
        "dataset": dataset,
        "input": {"name": "images", "dtype": "float32", "shape": [None, *model.image_shape],
                  "value_range": [low, high], "preprocessing": preprocessing or f"scale inputs to [{low}, {high}]"},
        "num_classes": model.num_classes,
        "class_names": class_names,
        "precision": {"serving": compute_precision(model.backbone), "training": training_precision},
        "max_batch_size": max_batch_size,  # of classify and energy: a larger request fails before any work
        "ood": ood.metadata(),
        "sample": {**limits, "clipped_to_value_range": True,
                   "sampler": model.sampler.get_config(),
                   "start": ("uniform noise on the value range" if model.chain_init is None else
                             f"class Gaussians of the training split (covariance rank {model.chain_init.rank} of "
                             f"{model.chain_init.dim}"
                             f"{', full' if model.chain_init.is_full_rank else ' + per-pixel residual'}"
                             f"), {model.replay_buffer.uniform_fraction:g} of them replaced by uniform noise as in "
                             "training; class_label -1 draws the class with the training class frequencies")
                            + (f"; {model.replay_buffer.flat_fraction:g} of them replaced by flat low-frequency fields"
                               if model.replay_buffer.flat_fraction else ""),
                   "defaults": "class_label -1 = unconditional; step_size <= 0 or noise_std < 0 = trained sampler's",
                   "bounds": "requests above max_num_samples, max_n_steps, max_step_size or max_noise_std are rejected "
                             "before any sampling; samples are clipped to input.value_range"},
        "signatures": {
            "classify": "images -> probabilities [N, K], logits [N, K], predicted_class [N]"
                        + (", predicted_class_name [N] (string)" if class_names else "") + " (also serving_default)",
            "energy": "images -> energy [N], log_px [N], ood_score [N] (higher = more in-distribution), "
                      "is_in_distribution [N] (bool: ood_score >= ood.threshold)",
            "sample": "num_samples, n_steps, seed, class_label, step_size, noise_std (scalars) -> "
                      "samples [num_samples, H, W, C] (clipped to input.value_range), energy [num_samples] (of the "
                      "clipped samples)",
            **({"classify_uint8": "images (uint8 pixels 0..255, scaled in the graph by x / 127.5 - 1) -> the outputs "
                                  "of classify"} if uint8_inputs else {}),
        },
    }

    def write_version(tmp):
        tf.saved_model.save(module, tmp, signatures=signatures)
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        write_warmup_requests(os.path.join(tmp, WARMUP_FILE), warmup_requests(model, uint8_inputs=uint8_inputs))

    # Atomic: a polling server sees the whole version or nothing. Another export may take the same version
    # between the check above and the rename: then the next free version (or, for a version asked for, an error).
    while True:
        try:
            write_atomically(target, write_version)
            return target
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not os.path.isdir(target):
                raise
            if not chosen:
                raise UsageError(f"Version {version} at {target!r} was written by another export at the same time; "
                                 "versions are never overwritten.") from error
            version = next_version(export_dir)
            target = os.path.join(export_dir, str(version))
            metadata["version"] = version
