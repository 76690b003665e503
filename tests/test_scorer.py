"""jem_tf.ood.scorer: OOD scores on hand-made data where the answer is known."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import gaussian_backbone, two_small_cnns

from jem_tf import metrics, ood
from jem_tf.ood import OODScorer


def test_log_px_and_gradient_norm_of_a_known_density(scorer):
    x = np.random.default_rng(0).normal(0, 0.7, (50, 4, 4, 1)).astype(np.float32)
    values = scorer.arrays(x, ["log_px", "grad_norm", "energy_t", "max_softmax"])
    squared = np.sum(x.reshape(50, -1).astype(np.float64) ** 2, axis=1)
    np.testing.assert_allclose(values["log_px"], -0.5 * squared, rtol=1e-5)
    # d/dx (-|x|^2 / 2) = -x, so the gradient norm is |x|.
    np.testing.assert_allclose(values["grad_norm"], -np.sqrt(squared), rtol=1e-5)
    # One class: T logsumexp(f / T) = f for any T; p(y|x) = 1.
    np.testing.assert_allclose(values["energy_t"], values["log_px"], rtol=1e-5)
    np.testing.assert_allclose(values["max_softmax"], 1.0)
    # A narrow Gaussian (in) against a wide one (out): log p(x) separates them almost perfectly.
    wide = np.random.default_rng(1).normal(0, 2.0, (50, 4, 4, 1)).astype(np.float32)
    assert metrics.auroc(values["log_px"], scorer.arrays(wide, ["log_px"])["log_px"]) > 0.99


def test_the_compressor_ranks_a_constant_image_as_simple():
    model = OODScorer(gaussian_backbone(), value_range=(-1.0, 1.0))
    rng = np.random.default_rng(0)
    constant = np.zeros((3, 4, 4, 1), np.float32)
    smooth = np.broadcast_to(np.linspace(-1, 1, 4, dtype=np.float32)[None, None, :, None], (3, 4, 4, 1)).copy()
    noise = rng.uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32)
    bits = {name: model.arrays(x, ["png_bits"])["png_bits"] for name, x in
            (("constant", constant), ("smooth", smooth), ("noise", noise))}
    assert bits["constant"].max() < bits["noise"].min() and bits["smooth"].max() <= bits["noise"].min()
    assert np.all(bits["constant"] == bits["constant"][0]) and bits["constant"][0] % 8 == 0


def test_mahalanobis_of_two_known_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 500)
    centers = np.array([[3.0, 0.0], [-3.0, 0.0]])
    features = centers[labels] + rng.normal(0, [1.0, 0.5], (1000, 2))
    means, precision = ood.tied_gaussian(features, labels, num_classes=2)
    np.testing.assert_allclose(means, centers, atol=0.15)
    np.testing.assert_allclose(precision, np.diag([1.0, 4.0]), rtol=0.15, atol=0.1)
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        ood.tied_gaussian(features[:500], labels[:500], num_classes=2)
    # In the scorer: features are the pixels; a point at a class mean scores 0 (the maximum).
    inputs = keras.Input((1, 2, 1))
    flat = keras.layers.Flatten()(inputs)
    backbone = keras.Model(inputs, keras.layers.Dense(2)(flat))
    scorer = OODScorer(backbone, value_range=(-10, 10), class_means=means, precision=precision)
    points = np.array([means[0], means[1], [0.0, 3.0]], np.float32).reshape(3, 1, 2, 1)
    scores = scorer.arrays(points, ["mahalanobis"])["mahalanobis"]
    np.testing.assert_allclose(scores[:2], 0.0, atol=1e-4)
    assert scores[2] < -20  # 3 std in the narrow direction: about -(3 * 2)^2 = -36 plus the x offset


def test_a_scorer_computes_its_source_classifiers_components_under_their_own_names(tiny_data):
    x, y = tiny_data
    model_net, source_net = two_small_cnns()
    source = OODScorer(source_net, temperature=3.0)
    source.class_means, source.precision = ood.tied_gaussian(
        source.arrays(x, ["features"])["features"], y, num_classes=3)
    scorer = OODScorer(model_net, source=source)
    assert "source_mahalanobis" in scorer.available and "source_png_bits" not in scorer.available
    assert "mahalanobis" not in scorer.available  # the model's own statistics were not fitted
    both = scorer.arrays(x, ["log_px", "source_mahalanobis", "source_energy_t", "png_bits"])
    alone = source.arrays(x, ["mahalanobis", "energy_t"])
    np.testing.assert_allclose(both["source_mahalanobis"], alone["mahalanobis"], rtol=1e-5)
    np.testing.assert_allclose(both["source_energy_t"], alone["energy_t"], rtol=1e-5)
    assert not np.allclose(both["log_px"], OODScorer(source_net).arrays(x, ["log_px"])["log_px"])
    with pytest.raises(ValueError, match="need the source classifier's scorer"):
        OODScorer(model_net).components(tf.constant(x[:2]), ["source_log_px"])
    assert scorer.with_backbone(model_net).source is source
    assert scorer.parameters()["source"]["temperature"] == 3.0
