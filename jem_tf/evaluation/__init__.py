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

:mod:`~jem_tf.evaluation.settings` holds :class:`EvaluationConfig` (every mode's settings),
:mod:`~jem_tf.evaluation.suite` runs the modes; :mod:`~jem_tf.evaluation.common` the helpers they share;
:mod:`jem_tf.metrics` the metrics on plain numpy arrays. The figures are drawn by :mod:`jem_tf.figures`.

Nothing is hidden: inputs are used as loaded (the training-time data noise is off) unless
``input_noise_std`` is given, and the report lists the transforms applied.
"""

import importlib as _importlib

# Public name -> the module of this package that defines it. Loaded on first use: the evaluate command builds its
# parser from :mod:`~jem_tf.evaluation.settings` alone, before TensorFlow is imported.
_MODULE_OF = {
    "evaluate_accuracy": "classification",
    "evaluate_calibration": "classification",
    "input_gradient_norms": "common",
    "predict_logits": "common",
    "refine_in_batches": "common",
    "FeatureNetwork": "frechet",
    "evaluate_frechet": "frechet",
    "load_feature_network": "frechet",
    "OOD_SCORES": "ood_benchmark",
    "evaluate_ood": "ood_benchmark",
    "load_ood_sets": "ood_benchmark",
    "ood_scores": "ood_benchmark",
    "synthetic_ood_images": "ood_benchmark",
    "evaluate_robustness": "robustness",
    "choose_refinement": "refinement_choice",
    "resolve_refinement": "refinement_choice",
    "RefinementChoice": "refinement_choice",
    "evaluate_samples": "samples",
    "MODES": "suite",
    "REPORT_FILE": "suite",
    "SCHEMA_VERSION": "suite",
    "evaluate": "suite",
    "summary_lines": "suite",
    "DEFAULT_MODES": "settings",
    "DEFAULT_PGD_EPS": "settings",
    "INCEPTION": "settings",
    "SYNTHETIC_OOD": "settings",
    "EvaluationConfig": "settings",
}


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'jem_tf.evaluation' has no attribute {name!r}")
    return getattr(_importlib.import_module(f"jem_tf.evaluation.{_MODULE_OF[name]}"), name)


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
