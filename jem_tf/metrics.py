"""Metrics on plain numpy arrays: calibration (ECE, MCE, NLL, Brier, temperature scaling),
out-of-distribution detection (AUROC, AUPR, FPR at 95 % TPR, the AUROC's standard error) and the Fréchet
distance of features.

A leaf module: it imports nothing from jem_tf, so the OOD detectors (:mod:`jem_tf.ood`), the evaluation
suite (:mod:`jem_tf.evaluation`) and the tuner all use these one definitions.

Conventions, stated once and recorded in reports:

* Calibration bins are ``num_bins`` equal-width bins of the top-class confidence on ``[0, 1]``;
  ECE = sum over bins of (bin size / N) * |accuracy - mean confidence| (``tfp.stats``' definition),
  MCE = the largest such gap over non-empty bins.
* OOD detection treats **in-distribution as the positive class**; every score is oriented so that
  higher means "more in-distribution". AUPR-in is the average precision with in-distribution positive,
  AUPR-out with OOD positive (on negated scores). FPR at 95 % TPR is the fraction of OOD inputs scored at
  or above the highest threshold that keeps at least 95 % of in-distribution inputs.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np


def _check_probabilities(probs: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or probs.shape[0] == 0:
        raise ValueError(f"Expected probabilities [N, K] and labels [N] with N >= 1; received shapes "
                         f"{probs.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"Labels must be in [0, {probs.shape[1]}); received range [{labels.min()}, {labels.max()}]")
    return probs, labels.astype(np.int64)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, *, num_bins: int = 20) -> Dict[str, list]:
    """Per-bin counts, accuracies and mean confidences of the top-class prediction (the reliability
    diagram's data). Bin ``i`` holds confidences in ``[i/B, (i+1)/B)``, the last bin also 1.0."""
    probs, labels = _check_probabilities(probs, labels)
    if not (isinstance(num_bins, int) and num_bins >= 1):
        raise ValueError(f"`num_bins` must be an int >= 1; received {num_bins!r}")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
    counts = np.bincount(index, minlength=num_bins)
    safe = np.maximum(counts, 1)
    return {
        "edges": np.linspace(0.0, 1.0, num_bins + 1).tolist(),
        "count": counts.tolist(),
        "accuracy": (np.bincount(index, weights=correct, minlength=num_bins) / safe).tolist(),
        "confidence": (np.bincount(index, weights=confidence, minlength=num_bins) / safe).tolist(),
    }


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, *, num_bins: int = 20) -> float:
    """ECE of ``softmax(logits)`` with ``num_bins`` equal-width confidence bins: the sum over bins of (bin size /
    N) * |accuracy - mean confidence| (the definition of ``tfp.stats.expected_calibration_error``, which the tests
    check it against)."""
    probs, labels = _check_probabilities(softmax(np.asarray(logits, dtype=np.float64)), labels)
    bins = reliability_bins(probs, labels, num_bins=num_bins)
    counts = np.asarray(bins["count"], dtype=np.float64)
    gaps = np.abs(np.asarray(bins["accuracy"]) - np.asarray(bins["confidence"]))
    return float((counts * gaps).sum() / counts.sum())


def calibration_metrics(logits: np.ndarray, labels: np.ndarray, *, num_bins: int = 20,
                        temperature: float = 1.0) -> Dict[str, object]:
    """Accuracy, ECE, MCE, NLL and Brier score of ``softmax(logits / temperature)``, plus the bins.

    Brier score is the mean over examples of ``sum_k (p_k - onehot_k)^2`` (range [0, 2]).
    """
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0; received {temperature!r}")
    logits = np.asarray(logits, dtype=np.float64) / temperature
    probs, labels = _check_probabilities(softmax(logits), labels)
    bins = reliability_bins(probs, labels, num_bins=num_bins)
    counts = np.asarray(bins["count"])
    gaps = np.abs(np.asarray(bins["accuracy"]) - np.asarray(bins["confidence"]))
    onehot = np.eye(probs.shape[1])[labels]
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs = log_probs - np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    return {
        "accuracy": float((probs.argmax(axis=1) == labels).mean()),
        "ece": expected_calibration_error(logits, labels, num_bins=num_bins),
        "mce": float(gaps[counts > 0].max()),
        "nll": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
        "num_bins": num_bins,
        "temperature": float(temperature),
        "bins": bins,
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, bounds: Tuple[float, float] = (0.01, 100.0)) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (Guo et al., 2017), found by
    bounded scalar minimisation over ``log T``."""
    from scipy import optimize

    logits = np.asarray(logits, dtype=np.float64)
    labels = _check_probabilities(softmax(logits), labels)[1]
    rows = np.arange(len(labels))

    def nll(log_t):
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[rows, labels] - np.log(np.exp(z).sum(axis=1))).mean())

    result = optimize.minimize_scalar(nll, bounds=np.log(bounds), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """AUROC with in-distribution as the positive class (ties count one half): the Mann-Whitney statistic
    ``U / (n_in n_out)`` from the ranks of all scores."""
    from scipy.stats import rankdata

    scores_in, scores_out = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
    ranks = rankdata(np.concatenate([scores_in, scores_out]))
    n_in, n_out = len(scores_in), len(scores_out)
    # U = (sum of the in-distribution ranks) - n_in (n_in + 1) / 2: the (in, out) pairs ordered correctly.
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0) / (n_in * n_out))


def auroc_standard_error(value: float, n_in: int, n_out: int) -> float:
    """The standard error of an AUROC ``value`` measured on ``n_in`` positives and ``n_out`` negatives
    (Hanley & McNeil, Radiology 1982)."""
    a = min(max(float(value), 1e-6), 1.0 - 1e-6)
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    variance = (a * (1 - a) + (n_in - 1) * (q1 - a * a) + (n_out - 1) * (q2 - a * a)) / (n_in * n_out)
    return math.sqrt(max(variance, 0.0))


def ood_metrics(scores_in: np.ndarray, scores_out: np.ndarray, *, tpr: float = 0.95) -> Dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR at ``tpr`` TPR of scores where higher = more in-distribution.

    In-distribution inputs are the positive class; the AUROC is :func:`auroc`, the precision-recall and
    ROC curves are scikit-learn's (``average_precision_score``, ``roc_curve``).
    """
    from sklearn import metrics

    scores_in = np.asarray(scores_in, dtype=np.float64).ravel()
    scores_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if scores_in.size == 0 or scores_out.size == 0:
        raise ValueError(f"Need at least one in- and one out-of-distribution score; received "
                         f"{scores_in.size} and {scores_out.size}")
    if not (np.all(np.isfinite(scores_in)) and np.all(np.isfinite(scores_out))):
        raise ValueError("OOD scores contain NaN or infinity.")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"`tpr` must be in (0, 1]; received {tpr!r}")
    y = np.concatenate([np.ones(scores_in.size), np.zeros(scores_out.size)])
    s = np.concatenate([scores_in, scores_out])
    fpr_curve, tpr_curve, _ = metrics.roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": auroc(scores_in, scores_out),
        "aupr_in": float(metrics.average_precision_score(y, s)),
        "aupr_out": float(metrics.average_precision_score(1 - y, -s)),
        f"fpr_at_{round(tpr * 100)}_tpr": float(fpr_curve[np.searchsorted(tpr_curve, tpr - 1e-12)]),
        "num_in": int(scores_in.size),
        "num_out": int(scores_out.size),
    }


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, D]`` features, N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"`features` must be [N >= 2, D]; received shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance between Gaussians: ``|m1 - m2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))``.

    The matrix square root is scipy's ``sqrtm``; a singular product gets a small diagonal offset (as
    the reference FID code does) and the tiny imaginary part of round-off is dropped.
    """
    from scipy import linalg

    mean1, mean2 = np.atleast_1d(mean1), np.atleast_1d(mean2)
    cov1, cov2 = np.atleast_2d(cov1), np.atleast_2d(cov2)
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != (mean1.size, mean1.size):
        raise ValueError(f"Mismatched statistics: means {mean1.shape}, {mean2.shape}; covariances "
                         f"{cov1.shape}, {cov2.shape}")
    root = linalg.sqrtm(cov1 @ cov2)
    if not np.all(np.isfinite(root)):
        offset = np.eye(cov1.shape[0]) * 1e-6
        root = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    root = np.real(root)
    diff = mean1 - mean2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(root), 0.0))
