"""jem_tf.model.energy: energies and densities of logits."""

import numpy as np
import tensorflow as tf
from scipy.special import logsumexp

from jem_tf.model import energy


def test_energy_is_negative_logsumexp():
    logits = np.random.default_rng(0).normal(size=(5, 7)).astype("float32")
    np.testing.assert_allclose(energy.energy(logits), -logsumexp(logits, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(energy.log_px(logits), logsumexp(logits, axis=-1), rtol=1e-5)


def test_shifting_logits_changes_log_px_but_not_p_y_given_x():
    logits = tf.random.stateless_normal([4, 10], seed=[1, 2])
    shift = tf.constant([[0.0], [3.0], [-5.0], [100.0]])
    shifted = logits + shift
    np.testing.assert_allclose(energy.p_y_given_x(shifted), energy.p_y_given_x(logits), atol=1e-6)
    np.testing.assert_allclose(energy.log_px(shifted) - energy.log_px(logits), shift[:, 0], rtol=1e-5)


def test_joint_decomposes_into_marginal_and_conditional():
    # log p(x, y) = log p(y|x) + log p(x)   (all up to the same log Z)
    logits = tf.random.stateless_normal([6, 4], seed=[3, 4])
    labels = tf.constant([0, 1, 2, 3, 0, 1])
    log_py = tf.gather(energy.log_py_given_x(logits), labels, axis=1, batch_dims=1)
    np.testing.assert_allclose(energy.log_pxy(logits, labels), log_py + energy.log_px(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(energy.conditional_energy(logits, labels), -energy.log_pxy(logits, labels))


def test_stable_for_huge_logits():
    logits = tf.constant([[1000.0, 1000.0], [-1000.0, -1000.0]])
    np.testing.assert_allclose(energy.log_px(logits), [1000.0 + np.log(2), -1000.0 + np.log(2)], rtol=1e-6)
    assert np.all(np.isfinite(energy.p_y_given_x(logits)))
    np.testing.assert_allclose(energy.p_y_given_x(logits), 0.5)
