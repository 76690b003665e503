"""The evaluation's name for :mod:`jem_tf.metrics` (the metrics on plain numpy arrays), kept because the
documentation and user code import it from here; the definitions live in :mod:`jem_tf.metrics`."""

from jem_tf.metrics import (
                            auroc,
                            auroc_standard_error,
                            calibration_metrics,
                            expected_calibration_error,
                            feature_statistics,
                            fit_temperature,
                            frechet_distance,
                            ood_metrics,
                            reliability_bins,
                            softmax,
)

__all__ = [
    "auroc",
    "auroc_standard_error",
    "calibration_metrics",
    "expected_calibration_error",
    "feature_statistics",
    "fit_temperature",
    "frechet_distance",
    "ood_metrics",
    "reliability_bins",
    "softmax",
]
