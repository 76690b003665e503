"""Out-of-distribution scores of a JEM, and a detector chosen without looking at any OOD test set.

One implementation, used by ``evaluate`` (every score on every OOD set), the serving export (the chosen
detector inside the ``energy`` signature) and the tuner's combined objective. Every score is oriented so
that **higher = more in-distribution**. One concept per module:

* :mod:`~jem_tf.ood.scorer`: the score components (``log_px``, ``max_softmax``, ``grad_norm``,
  ``energy_t``, ``mahalanobis``, ``png_bits``), computed in TensorFlow by :class:`OODScorer`;
* :mod:`~jem_tf.ood.detectors`: :class:`OODDetector`, a named combination of components, and the
  candidates (:func:`default_candidates`, or some of them by name: :func:`named_candidates`);
* :mod:`~jem_tf.ood.selection`: the rule that picks a candidate on the validation split and outliers made
  from it (:func:`select_detector`, :data:`SELECTION_RULE`, :func:`choose`) and the detector an export carries
  (:func:`fit_ood_detector`).

The AUROC and its standard error are the metrics of :mod:`jem_tf.metrics`; the evaluation mode that
reports every detector on OOD sets is :mod:`jem_tf.evaluation.ood_benchmark`.
"""

from jem_tf.metrics import auroc, auroc_standard_error
from jem_tf.ood.detectors import REDUCTIONS, OODDetector, Term, default_candidates, named_candidates, origin, single
from jem_tf.ood.scorer import COMPONENTS, SOURCE, OODScorer, describe, penultimate_model, png_bits, tied_gaussian
from jem_tf.ood.selection import SELECTION_RULE, FittedDetector, choose, fit_ood_detector, select_detector

__all__ = [
    "COMPONENTS",
    "REDUCTIONS",
    "SELECTION_RULE",
    "SOURCE",
    "FittedDetector",
    "OODDetector",
    "OODScorer",
    "Term",
    "auroc",
    "auroc_standard_error",
    "choose",
    "default_candidates",
    "describe",
    "fit_ood_detector",
    "named_candidates",
    "origin",
    "penultimate_model",
    "png_bits",
    "select_detector",
    "single",
    "tied_gaussian",
]
