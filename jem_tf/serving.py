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
  ``num_samples``, ``n_steps``, ``step_size`` and ``noise_std`` fixed at export time (see
  :func:`build_serving_module`). The returned ``samples`` are clipped to the model's value range (and ``energy``
  is that of the clipped samples), so every sample is a valid input of ``classify`` and ``energy`` even when the
  sampler has no ``clamp_range``.

The serving graph computes in float32 whatever the training precision (``serving_precision="float32"``, the
default: a model trained in mixed bfloat16 or float16 is served by a float32 copy of its network, the same
float32 weights, so any CPU and any stock TF Serving build runs it at full speed and precision);
``serving_precision="trained"`` keeps the training precision. The metadata's ``precision`` says which.

Images are float32 ``[N, H, W, C]`` (``N >= 1``) in the model's value range. A wrong dtype is rejected by the
signature's input spec; a wrong shape (rank, ``H, W, C`` or an empty batch), NaNs and out-of-range values by
in-graph checks (``InvalidArgumentError`` naming the expected shape or the range), because neither
``tf.saved_model.load`` nor TF Serving's C++ loader enforces the input spec's shape. The layout
is TF Serving's ``EXPORT_DIR/<version>/`` (written to a temporary directory and renamed, so a
polling server never sees a half-written version); ``assets.extra/jem_metadata.json`` records the
input spec, preprocessing, OOD calibration and sampling bounds, and ``assets.extra/tf_serving_warmup_requests``
holds one small request per signature, which TF Serving runs when it loads the version (its warm-up), so that the
first client request is not slow. All three are TF Serving *Predict* signatures (REST ``:predict``, gRPC
``PredictionService.Predict``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import time
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf

import jem_tf
from jem_tf import energy as energy_lib
from jem_tf import generation, seeds
from jem_tf.chain_init import start_chains
from jem_tf.choices import DEFAULT_MAX_BATCH_SIZE, MAX_N_STEPS_LIMIT, SERVING_PRECISIONS
from jem_tf.errors import UsageError
from jem_tf.files import remove_stale_temporaries, temporary_name, temporary_pattern, write_atomically
from jem_tf.inputs import check_image_shape_in_graph, check_images_in_graph
from jem_tf.jem import JEM
from jem_tf.networks import compute_precision, with_precision
from jem_tf.ood import FittedDetector, OODScorer, fit_ood_detector, single
from jem_tf.sgld import SGLDSampler

METADATA_FILE = os.path.join("assets.extra", "jem_metadata.json")
# TF Serving replays these requests when it loads a version, before it serves: the first client request is then
# as fast as the rest (https://www.tensorflow.org/tfx/serving/saved_model_warmup).
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
SIGNATURES = ("classify", "energy", "sample")
# Hard ceilings of the sample signature's bounds, whatever the export asks for: the samples of one request
# (max_num_samples x H x W x C float32; SGLD's activations and gradients need a multiple of that) must fit in
# 1 GiB, and a request runs at most 100,000 SGLD steps.
MAX_SAMPLE_BYTES = 2 ** 30
# An export is written to EXPORT_DIR/.tmp-export-HOST-PID and renamed to its version when complete.
EXPORT_TMP_PREFIX = ".tmp-export"
_OLD_EXPORT_TMP = re.compile(r"^\.tmp-\d+-(?P<pid>\d+)$")  # .tmp-VERSION-PID, before jem-tf named the host
# The most images one classify or energy request may hold (a larger request fails in-graph before any work).

_FLOAT32_MAX = float(np.finfo(np.float32).max)
# float32: the serving graph computes in float32 whatever the training precision; trained: as trained.


def serving_model(model: JEM, serving_precision: str = "float32") -> JEM:
    """The model an export serves: ``model`` itself, or for ``serving_precision="float32"`` and a model that
    computes in 16 bits, an inference twin whose network is a float32 copy of ``model.backbone`` (the same
    weights: mixed precision keeps them in float32) with the same sampler, start distribution, value range and
    refinement settings. Fit the OOD detector on the returned model, so that its threshold is calibrated on the
    scores the export will compute."""
    if serving_precision not in SERVING_PRECISIONS:
        raise UsageError(f"`serving_precision` must be one of {SERVING_PRECISIONS}; received {serving_precision!r}")
    if serving_precision == "trained" or compute_precision(model.backbone) == "float32":
        return model
    return JEM(with_precision(model.backbone, "float32"), sampler=model.sampler, buffer_size=1,
               value_range=model.value_range, seed=model.seed, image_shape=model.image_shape,
               num_classes=model.num_classes, chain_init=model.chain_init,
               chain_init_uniform_fraction=model.replay_buffer.uniform_fraction, refinement=model.refinement,
               name=f"{model.name}_float32")


def next_version(export_dir: str) -> int:
    """1 + the largest integer version directory under ``export_dir`` (1 if there is none)."""
    if not os.path.isdir(export_dir):
        return 1
    versions = [int(name) for name in os.listdir(export_dir) if name.isdigit()]
    return max(versions, default=0) + 1


def max_num_samples_limit(image_shape: Sequence[int]) -> int:
    """The largest ``max_num_samples`` allowed for images of ``image_shape``: ``MAX_SAMPLE_BYTES`` (1 GiB) of
    float32 samples per request."""
    return MAX_SAMPLE_BYTES // (4 * int(np.prod(image_shape)))


def check_max_batch_size(model: JEM, max_batch_size: int) -> int:
    """``max_batch_size`` of the ``classify`` and ``energy`` signatures, checked: an int in ``[1,
    max_num_samples_limit(image_shape)]`` (1 GiB of float32 images per request); ``UsageError`` (a
    ``ValueError``) naming it."""
    limit = max_num_samples_limit(model.image_shape)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= limit:
        raise UsageError(f"`max_batch_size` must be an int in [1, {limit}] for images of shape "
                         f"{list(model.image_shape)} (1 GiB of float32 images per request); "
                         f"received {max_batch_size!r}")
    return max_batch_size


def sample_limits(model: JEM, *, max_num_samples: int = 256, max_n_steps: int = 1000,
                  max_step_size: Optional[float] = None, max_noise_std: Optional[float] = None) -> dict:
    """The ``sample`` signature's upper bounds for ``model``, checked (``UsageError``, a ``ValueError``, naming the
    bad value) and with the defaults of ``max_step_size`` and ``max_noise_std`` filled in (see
    :func:`build_serving_module`)."""
    if not (isinstance(max_num_samples, int) and max_num_samples >= 1):
        raise UsageError(f"`max_num_samples` must be an int >= 1; received {max_num_samples!r}")
    limit = max_num_samples_limit(model.image_shape)
    if max_num_samples > limit:
        raise UsageError(f"`max_num_samples` must be <= {limit} for images of shape {list(model.image_shape)} (1 GiB "
                         f"of float32 samples per request); received {max_num_samples!r}")
    if not (isinstance(max_n_steps, int) and 1 <= max_n_steps <= MAX_N_STEPS_LIMIT):
        raise UsageError(f"`max_n_steps` must be an int in [1, {MAX_N_STEPS_LIMIT}]; received {max_n_steps!r}")
    sampler, (low, high) = model.sampler, model.value_range
    limits = {"max_num_samples": max_num_samples, "max_n_steps": max_n_steps}
    for name, value, trained, default in [
            ("max_step_size", max_step_size, sampler.step_size, 10.0 * sampler.step_size),
            ("max_noise_std", max_noise_std, sampler.noise_std, max(10.0 * sampler.noise_std, high - low))]:
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"`{name}` must be a number; received {value!r}")
        if not (math.isfinite(value) and 0 < value <= _FLOAT32_MAX):
            raise UsageError(f"`{name}` must be finite (as float32) and > 0; received {value!r}")
        if value < trained:
            raise UsageError(f"`{name}` must be >= the trained sampler's {name[4:]} {trained!r} (the signature's "
                             f"default); received {value!r}")
        limits[name] = float(value)
    return limits


def build_serving_module(model: JEM, *, ood: FittedDetector, max_num_samples: int = 256,
                         max_n_steps: int = 1000, max_step_size: Optional[float] = None,
                         max_noise_std: Optional[float] = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                         class_names: Optional[Sequence[str]] = None):
    """``(module, signatures)`` for ``tf.saved_model.save``: a ``tf.Module`` that tracks the backbone's
    variables only, and the three signatures (see the module docstring) plus ``serving_default``.

    ``class_names`` (one per class, e.g. an image folder's class folders): ``classify`` also returns
    ``predicted_class_name`` [N] (string).

    The ``sample`` signature's hard upper bounds (a request above one fails in-graph before any sampling, with an
    ``InvalidArgumentError`` naming the bound):

    * ``max_num_samples`` (default 256): at most ``max_num_samples_limit(image_shape)``, i.e. 1 GiB of float32
      samples per request (``ValueError`` above).
    * ``max_n_steps`` (default 1000): at most 100,000.
    * ``max_step_size`` (default 10x the trained sampler's ``step_size``): the step is tuned with the model, and
      an order of magnitude leaves room to explore while ruling out the absurd (1e30) steps that only return
      saturated or garbage samples.
    * ``max_noise_std`` (default ``max(10x the trained noise_std, high - low)`` of the value range): noise with a
      standard deviation of the value range's width already scatters a step over the whole range (and samples
      are clipped to it), so more only saturates pixels; the width also keeps the default meaningful for a
      sampler trained without noise.

    Both must be finite and > 0, and not below the trained values (which requests get by default).

    ``classify`` and ``energy`` take at most ``max_batch_size`` images per request (default 1024, at most 1 GiB of
    float32 images): a larger batch fails in-graph before the network runs, with an ``InvalidArgumentError``
    naming the bound (a client splits its images into batches; a million images at once would exhaust the server).

    (``keras.export.ExportArchive`` would work too, but it checkpoints every variable twice, doubling
    the export's size.)
    """
    limits = sample_limits(model, max_num_samples=max_num_samples, max_n_steps=max_n_steps,
                           max_step_size=max_step_size, max_noise_std=max_noise_std)
    max_step_size, max_noise_std = limits["max_step_size"], limits["max_noise_std"]
    max_batch_size = check_max_batch_size(model, max_batch_size)
    detector, scorer = ood.detector, ood.scorer
    if detector.threshold is None or not np.isfinite(detector.threshold):
        raise ValueError(f"The OOD detector needs a finite threshold; received {detector.threshold!r}")
    ood_components = sorted(set(detector.components) | {"logits"})
    backbone, chain_init = model.backbone, model.chain_init
    uniform_fraction = model.replay_buffer.uniform_fraction
    image_shape, value_range, num_classes = model.image_shape, model.value_range, model.num_classes
    # The sampler's settings without XLA: a portable graph for any TF Serving build.
    sampler = SGLDSampler.from_config({**model.sampler.get_config(), "jit_compile": False})
    images_spec = tf.TensorSpec([None, *image_shape], tf.float32, name="images")

    def logits_of(images):
        return tf.cast(backbone(images, training=False), tf.float32)

    def checked(images):
        images = check_image_shape_in_graph(images, image_shape)  # first: the batch bound needs a batch axis
        too_many = tf.debugging.assert_less_equal(
            tf.shape(images)[0], max_batch_size,
            message=f"a request holds at most max_batch_size = {max_batch_size} images (send larger sets in batches); "
                    "got")
        with tf.control_dependencies([too_many]):
            images = tf.identity(images)
        return check_images_in_graph(images, value_range)

    names = check_class_names(class_names, num_classes)

    def classify(images):
        logits = logits_of(checked(images))
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int64)
        outputs = {"probabilities": tf.nn.softmax(logits, axis=-1), "logits": logits, "predicted_class": predicted}
        if names is not None:
            outputs["predicted_class_name"] = tf.gather(tf.constant(names, tf.string), predicted)
        return outputs

    def energy(images):
        components = scorer.components(checked(images), ood_components)
        logits = components["logits"]
        ood_score = tf.cast(detector.combine(components), tf.float32)
        return {"energy": energy_lib.energy(logits), "log_px": energy_lib.log_px(logits), "ood_score": ood_score,
                "is_in_distribution": ood_score >= tf.constant(detector.threshold, tf.float32)}

    # class_label -1: unconditional E(x); otherwise the joint energy E(x, y) = -f(x)[y].
    sampling_energy = generation.sgld_energy_per_row(logits_of)

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
            tf.debugging.assert_less_equal(step_size, max_step_size,
                                           message=f"step_size must be <= max_step_size = {max_step_size}; got"),
            tf.debugging.assert_less_equal(noise_std, max_noise_std,
                                           message=f"noise_std must be <= max_noise_std = {max_noise_std}; got"),
        ]
        with tf.control_dependencies(checks):
            num_samples, n_steps, class_label, step_size, noise_std = (
                tf.identity(t) for t in (num_samples, n_steps, class_label, step_size, noise_std))
        step_size = tf.where(step_size > 0, step_size, sampler.step_size)
        noise_std = tf.where(noise_std >= 0, noise_std, sampler.noise_std)
        stateless_seed = tf.stack([seed, tf.constant(0, tf.int64)])  # JEM.sample's seed s is [s, 0] too
        labels = tf.fill([num_samples], class_label)
        # Where training chains start (chain_init.start_chains): the model's class Gaussians (of class_label, or of
        # classes drawn with the class prior) with its share of uniform noise, else uniform noise.
        x0 = start_chains(num_samples, stateless_seed, image_shape=image_shape, value_range=value_range,
                          init=chain_init, uniform_fraction=uniform_fraction, labels=labels)
        samples, _ = sampler.sample(
            sampling_energy, x0, seeds.fold(stateless_seed, seeds.SAMPLE_SGLD),
            context=(labels,), n_steps=n_steps, step_size=step_size, noise_std=noise_std)
        # Clipped to the value range: every sample is a valid input of classify and energy.
        samples = tf.clip_by_value(samples, *value_range)
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


def warmup_requests(model: JEM) -> dict:
    """``{signature: {input: array}}``: one small request per signature (one mid-range image for ``classify`` and
    ``energy``; one sample of one SGLD step for ``sample``), the export's TF Serving warm-up."""
    low, high = model.value_range
    image = np.full((1, *model.image_shape), (low + high) / 2, np.float32)
    return {"classify": {"images": image}, "energy": {"images": image},
            "sample": {"num_samples": np.int32(1), "n_steps": np.int32(1), "seed": np.int64(0),
                       "class_label": np.int32(-1), "step_size": np.float32(0.0), "noise_std": np.float32(-1.0)}}


def _length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (a message, string or bytes)."""
    def varint(value):
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def write_warmup_requests(path: str, requests: dict) -> None:
    """Writes TF Serving's warm-up file: a TFRecord of ``PredictionLog`` messages (``predict_log.request``: a
    ``PredictRequest`` with ``model_spec.signature_name`` and its ``inputs``), one per ``{signature: {input:
    array}}`` item. The messages are encoded here (five length-delimited fields of tensorflow_serving/apis'
    ``prediction_log.proto``, ``predict.proto`` and ``model.proto``) so that exporting does not need the
    tensorflow-serving-api package; the tests parse them with it."""
    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in requests.items():
            model_spec = _length_delimited(3, signature.encode())  # ModelSpec.signature_name = 3
            request = _length_delimited(1, model_spec)  # PredictRequest.model_spec = 1
            for name, array in inputs.items():  # PredictRequest.inputs = 2: map entries {key = 1, value = 2}
                entry = _length_delimited(1, name.encode()) + _length_delimited(
                    2, tf.make_tensor_proto(array).SerializeToString())
                request += _length_delimited(2, entry)
            writer.write(_length_delimited(6, _length_delimited(1, request)))  # PredictionLog.predict_log = 6


def check_class_names(class_names: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """``class_names`` as a list of ``num_classes`` distinct non-empty strings, or ``None``; else a ``ValueError``."""
    if class_names is None:
        return None
    names = list(class_names)
    if (len(names) != num_classes or any(not isinstance(n, str) or not n for n in names)
            or len(set(names)) != len(names)):
        raise ValueError(f"`class_names` must be {num_classes} distinct non-empty strings (one per class); "
                         f"received {class_names!r}")
    return names


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
            precision; see :func:`serving_model`) or ``"trained"``. An ``ood`` fitted on the training-precision
            model is moved to the served network with its threshold unchanged (fit it on
            ``serving_model(model)`` to calibrate on the served scores, as ``python -m jem_tf.export`` does).

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
    module, signatures = build_serving_module(model, ood=ood, max_batch_size=max_batch_size, class_names=class_names,
                                              **limits)
    os.makedirs(export_dir, exist_ok=True)
    # Temporaries of exports killed mid-write (this host's dead processes) go; then ours is written.
    remove_stale_temporaries(export_dir, temporary_pattern(EXPORT_TMP_PREFIX), _OLD_EXPORT_TMP)
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
                             "training; class_label -1 draws the class with the training class frequencies"),
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
        },
    }

    def write_version(tmp):
        tf.saved_model.save(module, tmp, signatures=signatures)
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        write_warmup_requests(os.path.join(tmp, WARMUP_FILE), warmup_requests(model))

    # Atomic: a polling server sees the whole version or nothing. Another export may take the same version
    # between the check above and the rename: then the next free version (or, for a version asked for, an error).
    while True:
        try:
            write_atomically(target, write_version, tmp=os.path.join(export_dir, temporary_name(EXPORT_TMP_PREFIX)))
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
