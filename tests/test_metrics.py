"""jem_tf.metrics: evaluation metrics against values computed by hand on tiny arrays."""

import math

import numpy as np
import pytest

from jem_tf import metrics


def _logits(probabilities):
    return np.log(np.asarray(probabilities, dtype=np.float64))


# Four two-class predictions, 5 bins of width 0.2:
#   conf 0.90 correct, 0.85 wrong  -> bin [0.8, 1.0): accuracy 0.5, confidence 0.875, gap 0.375
#   conf 0.65 correct, 0.70 correct -> bin [0.6, 0.8): accuracy 1.0, confidence 0.675, gap 0.325
PROBS = [[0.9, 0.1], [0.85, 0.15], [0.65, 0.35], [0.3, 0.7]]
LABELS = [0, 1, 0, 1]


def test_calibration_metrics_match_hand_computed_values():
    result = metrics.calibration_metrics(_logits(PROBS), LABELS, num_bins=5)
    assert result["ece"] == pytest.approx(0.5 * 0.375 + 0.5 * 0.325, abs=1e-6)  # 0.35, via tfp
    assert result["mce"] == pytest.approx(0.375)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.15) + math.log(0.65) + math.log(0.7)) / 4)
    # Brier: sum_k (p_k - onehot_k)^2 per example = 0.02, 1.445, 0.245, 0.18.
    assert result["brier"] == pytest.approx((0.02 + 1.445 + 0.245 + 0.18) / 4)
    bins = result["bins"]
    assert bins["count"] == [0, 0, 0, 2, 2]
    assert bins["accuracy"][3:] == pytest.approx([1.0, 0.5])
    assert bins["confidence"][3:] == pytest.approx([0.675, 0.875])


def test_ece_equals_the_bin_definition_and_tensorflow_probabilitys_ece():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(400, 6)) * 2.5
    labels = rng.integers(0, 6, 400)
    result = metrics.calibration_metrics(logits, labels, num_bins=20)
    counts = np.asarray(result["bins"]["count"])
    gaps = np.abs(np.asarray(result["bins"]["accuracy"]) - np.asarray(result["bins"]["confidence"]))
    assert counts.sum() == 400
    assert result["ece"] == pytest.approx((counts * gaps).sum() / 400, abs=1e-12)
    # tensorflow-probability (the test extra; the library does not need it) computes the same number.
    tfp = pytest.importorskip("tensorflow_probability")
    import tensorflow as tf

    expected = tfp.stats.expected_calibration_error(20, logits=tf.constant(logits, tf.float32),
                                                    labels_true=tf.constant(labels, tf.int32))
    assert result["ece"] == pytest.approx(float(expected), abs=1e-6)


def test_temperature_scaling_recovers_the_generating_temperature():
    rng = np.random.default_rng(2)
    true_logits = rng.normal(size=(4000, 5)) * 2.0
    probabilities = metrics.softmax(true_logits)
    labels = np.array([rng.choice(5, p=p) for p in probabilities])
    overconfident = true_logits * 3.0  # the right temperature is 3
    temperature = metrics.fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.08)
    before = metrics.calibration_metrics(overconfident, labels)
    after = metrics.calibration_metrics(overconfident, labels, temperature=temperature)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    assert after["accuracy"] == before["accuracy"]  # a temperature never changes the argmax


def test_ood_metrics_match_hand_computed_values():
    # In-distribution positive. Ranking: 0.9 in, 0.8 in, 0.7 out, 0.4 in, 0.3 out.
    result = metrics.ood_metrics([0.9, 0.8, 0.4], [0.7, 0.3])
    assert result["auroc"] == pytest.approx(5 / 6)  # 5 of the 6 (in, out) pairs ordered correctly
    assert result["aupr_in"] == pytest.approx((1 + 1 + 3 / 4) / 3)  # precision 1, 1, 3/4 at each in-recall step
    assert result["aupr_out"] == pytest.approx((1 + 2 / 3) / 2)  # negated scores: 0.3 out first, 0.7 out third
    assert result["fpr_at_95_tpr"] == pytest.approx(0.5)  # keeping all 3 in needs threshold 0.4: 0.7 passes
    assert (result["num_in"], result["num_out"]) == (3, 2)


def test_auroc_counts_ordered_pairs_and_ties_as_one_half():
    assert metrics.auroc([0.9, 0.8, 0.4], [0.7, 0.3]) == pytest.approx(5 / 6)
    assert metrics.auroc([1.0, 2.0], [1.0, 0.0]) == pytest.approx((1.5 + 2) / 4)  # one tie of four pairs
    assert metrics.auroc([5.0, 6.0], [1.0, 2.0]) == 1.0 and metrics.auroc([1.0, 2.0], [5.0, 6.0]) == 0.0
    rng = np.random.default_rng(4)
    scores_in, scores_out = rng.normal(1.0, 1.0, 300).round(1), rng.normal(0.0, 1.0, 200).round(1)
    assert metrics.auroc(scores_in, scores_out) == pytest.approx(
        metrics.ood_metrics(scores_in, scores_out)["auroc"], abs=1e-12)


def test_ood_metrics_use_the_one_auroc():
    rng = np.random.default_rng(5)
    scores_in, scores_out = rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 70)
    assert metrics.ood_metrics(scores_in, scores_out)["auroc"] == metrics.auroc(scores_in, scores_out)


def test_fpr_at_95_tpr_uses_the_highest_threshold_that_keeps_95_percent():
    scores_in = np.arange(1, 21, dtype=float)  # threshold 2 keeps 19 of 20 = 95 %
    result = metrics.ood_metrics(scores_in, [0.5, 1.5, 2.5, 30.0])
    assert result["fpr_at_95_tpr"] == pytest.approx(0.5)  # 2.5 and 30 are >= 2
    separated = metrics.ood_metrics([5.0, 6.0], [1.0, 2.0])
    assert separated["auroc"] == 1.0 and separated["fpr_at_95_tpr"] == 0.0
    assert separated["aupr_in"] == 1.0 and separated["aupr_out"] == 1.0


def test_frechet_distance_closed_forms():
    # 1-D: (0 - 3)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 10.
    assert metrics.frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]])) == \
        pytest.approx(10.0)
    rng = np.random.default_rng(3)
    features = rng.normal(size=(500, 4))
    stats = metrics.feature_statistics(features)
    assert metrics.frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-6)
    shifted = metrics.feature_statistics(features + np.array([1.0, 0.0, 0.0, 2.0]))
    assert metrics.frechet_distance(*stats, *shifted) == pytest.approx(5.0, abs=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.calibration_metrics(np.zeros((3, 2)), [0, 1]), "shapes"),
    (lambda: metrics.calibration_metrics(np.zeros((2, 2)), [0, 2]), "Labels must be in"),
    (lambda: metrics.calibration_metrics(np.zeros((2, 2)), [0, 1], num_bins=0), "num_bins"),
    (lambda: metrics.calibration_metrics(np.zeros((2, 2)), [0, 1], temperature=0.0), "temperature"),
    (lambda: metrics.ood_metrics([], [1.0]), "at least one"),
    (lambda: metrics.ood_metrics([np.nan], [1.0]), "NaN"),
    (lambda: metrics.feature_statistics(np.zeros((1, 3))), "N >= 2"),
    (lambda: metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "Mismatched"),
])
def test_bad_inputs_are_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_metrics_is_a_leaf_module():
    """The OOD detectors and the evaluation both import jem_tf.metrics: it imports nothing from jem_tf."""
    import ast

    tree = ast.parse(open(metrics.__file__).read())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name and name.split(".")[0] == "jem_tf"]
