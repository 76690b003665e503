"""SavedModel export for TensorFlow Serving (the library behind ``python -m jem_tf.export``).

The export holds the backbone only (no replay buffer, no optimizer) and three signatures:

* ``classify`` (also ``serving_default``): ``images`` -> ``probabilities``, ``logits``,
  ``predicted_class``.
* ``energy``: ``images`` -> ``energy`` (``-logsumexp f(x)``), ``log_px`` (``logsumexp f(x)``),
  ``ood_score`` (the OOD detector chosen at export time, higher = more in-distribution; see
  :mod:`jem_tf.ood`) and ``is_in_distribution`` (``ood_score >= threshold``; the threshold is calibrated
  at export time so that a chosen fraction, default 95 %, of held-out in-distribution images pass). What
  the detector needs beyond the backbone (feature statistics, a temperature) is part of the export.
* ``sample``: ``num_samples``, ``n_steps``, ``seed``, ``class_label`` (-1: unconditional),
  ``step_size`` and ``noise_std`` (<= 0 resp. < 0: the trained sampler's) -> ``samples``, ``energy``:
  SGLD inside the signature from the model's start distribution (its class Gaussians when it was trained
  with them, which the export then carries; else uniform noise), deterministic per seed, with hard upper bounds on
  ``num_samples`` and ``n_steps`` fixed at export time.

Images are float32 ``[batch, H, W, C]`` in the model's value range; other shapes and dtypes are
rejected by the signature's input spec, NaNs and out-of-range values by an in-graph check. The layout
is TF Serving's ``EXPORT_DIR/<version>/`` (written to a temporary directory and renamed, so a
polling server never sees a half-written version); ``assets.extra/jem_metadata.json`` records the
input spec, preprocessing, OOD calibration and sampling bounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Optional

import numpy as np
import tensorflow as tf

import jem_tf
from jem_tf import energy as energy_lib
from jem_tf import seeds
from jem_tf.inputs import check_images_in_graph
from jem_tf.jem import JEM
from jem_tf.ood import FittedDetector, OODScorer, fit_ood_detector, single
from jem_tf.sgld import SGLDSampler

METADATA_FILE = os.path.join("assets.extra", "jem_metadata.json")
SIGNATURES = ("classify", "energy", "sample")


def next_version(export_dir: str) -> int:
    """1 + the largest integer version directory under ``export_dir`` (1 if there is none)."""
    if not os.path.isdir(export_dir):
        return 1
    versions = [int(name) for name in os.listdir(export_dir) if name.isdigit()]
    return max(versions, default=0) + 1


def build_serving_module(model: JEM, *, ood: FittedDetector, max_num_samples: int = 256,
                         max_n_steps: int = 1000):
    """``(module, signatures)`` for ``tf.saved_model.save``: a ``tf.Module`` that tracks the backbone's
    variables only, and the three signatures (see the module docstring) plus ``serving_default``.

    (``keras.export.ExportArchive`` would work too, but it checkpoints every variable twice, doubling
    the export's size.)
    """
    if not (isinstance(max_num_samples, int) and max_num_samples >= 1):
        raise ValueError(f"`max_num_samples` must be an int >= 1; received {max_num_samples!r}")
    if not (isinstance(max_n_steps, int) and max_n_steps >= 1):
        raise ValueError(f"`max_n_steps` must be an int >= 1; received {max_n_steps!r}")
    detector, scorer = ood.detector, ood.scorer
    if detector.threshold is None or not np.isfinite(detector.threshold):
        raise ValueError(f"The OOD detector needs a finite threshold; received {detector.threshold!r}")
    ood_components = sorted(set(detector.components) | {"logits"})
    backbone, chain_init = model.backbone, model.chain_init
    image_shape, value_range, num_classes = model.image_shape, model.value_range, model.num_classes
    # The sampler's settings without XLA: a portable graph for any TF Serving build.
    sampler = SGLDSampler.from_config({**model.sampler.get_config(), "jit_compile": False})
    images_spec = tf.TensorSpec([None, *image_shape], tf.float32, name="images")

    def logits_of(images):
        return tf.cast(backbone(images, training=False), tf.float32)

    def classify(images):
        logits = logits_of(check_images_in_graph(images, value_range))
        return {"probabilities": tf.nn.softmax(logits, axis=-1), "logits": logits,
                "predicted_class": tf.argmax(logits, axis=-1, output_type=tf.int64)}

    def energy(images):
        components = scorer.components(check_images_in_graph(images, value_range), ood_components)
        logits = components["logits"]
        ood_score = tf.cast(detector.combine(components), tf.float32)
        return {"energy": energy_lib.energy(logits), "log_px": energy_lib.log_px(logits), "ood_score": ood_score,
                "is_in_distribution": ood_score >= tf.constant(detector.threshold, tf.float32)}

    def sampling_energy(x, labels):
        logits = logits_of(x)
        # class_label -1: unconditional E(x); otherwise the joint energy E(x, y) = -f(x)[y].
        conditional = energy_lib.conditional_energy(logits, tf.maximum(labels, 0))
        return tf.where(labels >= 0, conditional, energy_lib.energy(logits))

    def sample(num_samples, n_steps, seed, class_label, step_size, noise_std):
        checks = [
            tf.debugging.assert_greater_equal(num_samples, 1, message="num_samples must be >= 1; got"),
            tf.debugging.assert_less_equal(
                num_samples, max_num_samples, message=f"num_samples must be <= {max_num_samples}; got"),
            tf.debugging.assert_greater_equal(n_steps, 0, message="n_steps must be >= 0; got"),
            tf.debugging.assert_less_equal(n_steps, max_n_steps, message=f"n_steps must be <= {max_n_steps}; got"),
            tf.debugging.assert_greater_equal(class_label, -1, message="class_label must be -1 or a class id; got"),
            tf.debugging.assert_less(class_label, num_classes, message=f"class_label must be < {num_classes}; got"),
            tf.debugging.assert_all_finite(step_size, message="step_size must be finite"),
            tf.debugging.assert_all_finite(noise_std, message="noise_std must be finite"),
        ]
        with tf.control_dependencies(checks):
            num_samples, n_steps, class_label = (tf.identity(t) for t in (num_samples, n_steps, class_label))
        step_size = tf.where(step_size > 0, step_size, sampler.step_size)
        noise_std = tf.where(noise_std >= 0, noise_std, sampler.noise_std)
        stateless_seed = tf.stack([seed, tf.constant(0, tf.int64)])
        labels = tf.fill([num_samples], class_label)
        if chain_init is None:
            low, high = value_range
            x0 = tf.random.stateless_uniform(tf.concat([[num_samples], image_shape], 0), seed=stateless_seed,
                                             minval=low, maxval=high)
        else:
            # The model's class Gaussians: of class_label, or of classes drawn with the class prior.
            start_labels = tf.where(labels >= 0, labels, chain_init.draw_labels(num_samples, stateless_seed))
            x0 = chain_init.sample(num_samples, stateless_seed, labels=start_labels)
        samples, _ = sampler.sample(
            sampling_energy, x0, seeds.fold(stateless_seed, seeds.SERVING_SGLD),
            context=(labels,), n_steps=n_steps, step_size=step_size, noise_std=noise_std)
        return {"samples": samples, "energy": energy_lib.energy(logits_of(samples))}

    module = tf.Module(name="jem_serving")
    # The tf.Variables behind the backbone's Keras variables: saved once, captured by the signatures.
    module.backbone_variables = [variable.value for variable in backbone.variables]
    if chain_init is not None:  # the class Gaussians the sample signature starts from
        module.chain_init_variables = [variable.value for variable in chain_init.variables]
    classify_fn = tf.function(classify, input_signature=[images_spec]).get_concrete_function()
    signatures = {
        "serving_default": classify_fn,
        "classify": classify_fn,
        "energy": tf.function(energy, input_signature=[images_spec]).get_concrete_function(),
        "sample": tf.function(sample, input_signature=[
            tf.TensorSpec([], tf.int32, name="num_samples"),
            tf.TensorSpec([], tf.int32, name="n_steps"),
            tf.TensorSpec([], tf.int64, name="seed"),
            tf.TensorSpec([], tf.int32, name="class_label"),
            tf.TensorSpec([], tf.float32, name="step_size"),
            tf.TensorSpec([], tf.float32, name="noise_std"),
        ]).get_concrete_function(),
    }
    return module, signatures


def export_saved_model(model: JEM, export_dir: str, *, version: Optional[int] = None,
                       ood: Optional[FittedDetector] = None, calibration_images: Optional[np.ndarray] = None,
                       calibration_split: str = "given", ood_threshold: Optional[float] = None,
                       tpr: float = 0.95, max_num_samples: int = 256, max_n_steps: int = 1000,
                       preprocessing: str = "", dataset: str = "") -> str:
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
        max_num_samples, max_n_steps: Hard bounds of the ``sample`` signature. Defaults 256, 1000.
        preprocessing: How raw inputs map to the model's value range (recorded in the metadata).
        dataset: Name of the training data (recorded in the metadata).

    Example:
        >>> path = export_saved_model(model, "/models/jem", calibration_images=x_val)
    """
    if not isinstance(model, JEM):
        raise ValueError(f"`model` must be a jem_tf.JEM; received {type(model).__name__}")
    if sum(x is not None for x in (ood, calibration_images, ood_threshold)) != 1:
        raise ValueError("Pass exactly one of `ood`, `calibration_images` and `ood_threshold`.")
    if version is None:
        version = next_version(export_dir)
    if not (isinstance(version, int) and version >= 0):
        raise ValueError(f"`version` must be an int >= 0; received {version!r}")
    target = os.path.join(export_dir, str(version))
    if os.path.exists(target):
        raise ValueError(f"Version {version} already exists at {target!r}; versions are never overwritten.")
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
    module, signatures = build_serving_module(model, ood=ood, max_num_samples=max_num_samples,
                                              max_n_steps=max_n_steps)
    os.makedirs(export_dir, exist_ok=True)
    tmp = os.path.join(export_dir, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures=signatures)
    low, high = model.value_range
    metadata = {
        "format": "jem-tf SavedModel for TensorFlow Serving",
        "jem_tf_version": jem_tf.__version__,
        "tensorflow_version": tf.__version__,
        "exported_at_unix": int(time.time()),
        "version": version,
        "dataset": dataset,
        "input": {"name": "images", "dtype": "float32", "shape": [None, *model.image_shape],
                  "value_range": [low, high], "preprocessing": preprocessing or f"scale inputs to [{low}, {high}]"},
        "num_classes": model.num_classes,
        "ood": ood.metadata(),
        "sample": {"max_num_samples": max_num_samples, "max_n_steps": max_n_steps,
                   "sampler": model.sampler.get_config(),
                   "start": ("uniform noise on the value range" if model.chain_init is None else
                             f"class Gaussians of the training split (covariance rank {model.chain_init.rank} of "
                             f"{model.chain_init.dim}{', full' if model.chain_init.is_full_rank else ' + per-pixel residual'}"
                             "); class_label -1 draws the class with the training class frequencies"),
                   "defaults": "class_label -1 = unconditional; step_size <= 0 or noise_std < 0 = trained sampler's"},
        "signatures": {
            "classify": "images -> probabilities [N, K], logits [N, K], predicted_class [N] (also serving_default)",
            "energy": "images -> energy [N], log_px [N], ood_score [N] (higher = more in-distribution), "
                      "is_in_distribution [N] (bool: ood_score >= ood.threshold)",
            "sample": "num_samples, n_steps, seed, class_label, step_size, noise_std (scalars) -> "
                      "samples [num_samples, H, W, C], energy [num_samples]",
        },
    }
    os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    os.rename(tmp, target)  # atomic: a polling server sees the whole version or nothing
    return target
