"""SavedModel export for TensorFlow Serving (the library behind ``python -m jem_tf.export``).

The export holds the backbone only (no replay buffer, no optimizer) and three signatures (four for a model of 8-bit
images: ``classify_uint8`` takes raw ``uint8`` pixels):

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

Modules: :mod:`~jem_tf.serving.signatures` (the served model and its signatures), :mod:`~jem_tf.serving.limits`
(the bounds), :mod:`~jem_tf.serving.warmup` (TF Serving's warm-up requests), :mod:`~jem_tf.serving.saved_model`
(writing a version).
"""

from jem_tf.choices import DEFAULT_MAX_BATCH_SIZE, MAX_N_STEPS_LIMIT, SERVING_PRECISIONS
from jem_tf.serving.limits import MAX_SAMPLE_BYTES, check_max_batch_size, max_num_samples_limit, sample_limits
from jem_tf.serving.saved_model import METADATA_FILE, export_saved_model, next_version
from jem_tf.serving.signatures import SIGNATURES, build_serving_module, check_class_names, serving_model
from jem_tf.serving.warmup import WARMUP_FILE, warmup_requests, write_warmup_requests

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "MAX_N_STEPS_LIMIT",
    "MAX_SAMPLE_BYTES",
    "METADATA_FILE",
    "SERVING_PRECISIONS",
    "SIGNATURES",
    "WARMUP_FILE",
    "build_serving_module",
    "check_class_names",
    "check_max_batch_size",
    "export_saved_model",
    "max_num_samples_limit",
    "next_version",
    "sample_limits",
    "serving_model",
    "warmup_requests",
    "write_warmup_requests",
]
