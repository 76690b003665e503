"""Evaluation suite: :func:`evaluate` and one function per mode (``python -m jem_tf.evaluate`` is its command).

Checks the paper's claims on a trained model and writes ``report.json`` (every number with the settings
that produced it) and PNG figures. The modes, one module each:

* ``accuracy`` (:mod:`~jem_tf.evaluation.classification`): test accuracy, also after K SGLD refinement
  steps of the inputs.
* ``calibration`` (:mod:`~jem_tf.evaluation.classification`): ECE, MCE, NLL, Brier, a
  reliability diagram, and temperature scaling fitted on the run's validation split (never on test data).
* ``ood`` (:mod:`~jem_tf.evaluation.ood_benchmark`): scores log p(x), max p(y|x), the input-gradient norm
  ("approximate mass") and the temperature-scaled energy against any loadable dataset and the synthetic
  sets ``uniform``, ``constant`` and ``permuted``; AUROC, AUPR-in/out and FPR at 95 % TPR with
  in-distribution positive.
* ``samples`` (:mod:`~jem_tf.evaluation.samples`): unconditional and class-conditional grids from fresh
  noise, replay-buffer grids and a long chain with its energy trace.
* ``frechet`` (:mod:`~jem_tf.evaluation.frechet`): the Fréchet distance between test images and samples in
  the features of a network the user names (never called "FID" unless that network is the Inception
  network).
* ``robustness`` (:mod:`~jem_tf.evaluation.robustness`): PGD L-inf / L2 accuracy with and without SGLD
  refinement before classifying.

:mod:`~jem_tf.evaluation.suite` holds :class:`EvaluationConfig` (every mode's settings) and runs the
modes; :mod:`~jem_tf.evaluation.common` the helpers they share; :mod:`jem_tf.metrics` the metrics on plain
numpy arrays. The figures are drawn by
:mod:`jem_tf.figures`.

Nothing is hidden: inputs are used as loaded (the training-time data noise is off) unless
``input_noise_std`` is given, and the report lists the transforms applied.
"""

from jem_tf.evaluation.classification import evaluate_accuracy, evaluate_calibration
from jem_tf.evaluation.common import input_gradient_norms, predict_logits, refine_in_batches
from jem_tf.evaluation.frechet import INCEPTION, FeatureNetwork, evaluate_frechet, load_feature_network
from jem_tf.evaluation.ood_benchmark import (
    OOD_SCORES,
    SYNTHETIC_OOD,
    evaluate_ood,
    load_ood_sets,
    ood_scores,
    synthetic_ood_images,
)
from jem_tf.evaluation.robustness import DEFAULT_PGD_EPS, evaluate_robustness
from jem_tf.evaluation.samples import evaluate_samples
from jem_tf.evaluation.suite import (
    DEFAULT_MODES,
    MODES,
    REPORT_FILE,
    SCHEMA_VERSION,
    EvaluationConfig,
    evaluate,
    summary_lines,
)

__all__ = [
    "DEFAULT_MODES",
    "DEFAULT_PGD_EPS",
    "INCEPTION",
    "MODES",
    "OOD_SCORES",
    "REPORT_FILE",
    "SCHEMA_VERSION",
    "SYNTHETIC_OOD",
    "EvaluationConfig",
    "FeatureNetwork",
    "evaluate",
    "evaluate_accuracy",
    "evaluate_calibration",
    "evaluate_frechet",
    "evaluate_ood",
    "evaluate_robustness",
    "evaluate_samples",
    "input_gradient_norms",
    "load_feature_network",
    "load_ood_sets",
    "ood_scores",
    "predict_logits",
    "refine_in_batches",
    "summary_lines",
    "synthetic_ood_images",
]
