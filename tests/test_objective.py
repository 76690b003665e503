"""jem_tf.model.objective: the JEM objective as a pure function of logits, against its formula."""

import numpy as np
import pytest
import tensorflow as tf

from jem_tf.model.objective import jem_objective


def _logsumexp(a):
    return np.logaddexp.reduce(a, axis=1)


def _ce(logits, labels):
    return _logsumexp(logits) - logits[np.arange(len(labels)), labels]


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits_data = rng.normal(size=(6, 4)).astype(np.float32)
    logits_sample = rng.normal(1.0, 2.0, size=(6, 4)).astype(np.float32)
    logits_cond = rng.normal(-1.0, 1.0, size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 1, 0], np.int32)
    return logits_data, logits_sample, logits_cond, labels


def test_every_term_matches_its_formula(batch):
    logits_data, logits_sample, logits_cond, labels = batch
    terms = jem_objective(labels, logits_data, logits_sample=logits_sample, logits_conditional_sample=logits_cond,
                          pyx_weight=0.7, px_weight=1.3, pxy_weight=0.4, energy_l2_weight=0.1)
    d, s, c = (x.astype(np.float64) for x in (logits_data, logits_sample, logits_cond))
    ce = _ce(d, labels).mean()
    e_data, e_sample = -_logsumexp(d), -_logsumexp(s)
    rows = np.arange(len(labels))
    conditional = (-d[rows, labels]).mean() - (-c[rows, labels]).mean()
    expected = (0.7 * ce + 1.3 * (e_data.mean() - e_sample.mean()) + 0.4 * conditional
                + 0.1 * (np.mean(e_data ** 2) + np.mean(e_sample ** 2)))
    np.testing.assert_allclose(float(terms.loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(terms.ce), ce, rtol=1e-5)
    np.testing.assert_allclose(terms.e_data.numpy(), e_data, rtol=1e-5)
    np.testing.assert_allclose(terms.e_sample.numpy(), e_sample, rtol=1e-5)
    np.testing.assert_allclose(float(terms.energy_gap), e_data.mean() - e_sample.mean(), rtol=1e-5, atol=1e-6)


def test_the_energy_l2_term_is_centred_and_the_centre_changes_nothing_else(batch):
    logits_data, logits_sample, _, labels = batch
    kwargs = dict(logits_sample=logits_sample, px_weight=1.0, energy_l2_weight=0.1)
    # A constant added to every logit shifts every energy by -12: centred on -12, the loss is unchanged.
    shifted = jem_objective(labels, logits_data + 12.0, **{**kwargs, "logits_sample": logits_sample + 12.0},
                            energy_l2_center=-12.0)
    plain = jem_objective(labels, logits_data, **kwargs)
    np.testing.assert_allclose(float(shifted.loss), float(plain.loss), rtol=1e-4)
    e_data, e_sample = -_logsumexp(logits_data.astype(np.float64)), -_logsumexp(logits_sample.astype(np.float64))
    centred = jem_objective(labels, logits_data, energy_l2_center=-3.0, **kwargs)
    without_l2 = jem_objective(labels, logits_data, **{**kwargs, "energy_l2_weight": 0.0})
    expected_l2 = 0.1 * (np.mean((e_data + 3.0) ** 2) + np.mean((e_sample + 3.0) ** 2))
    np.testing.assert_allclose(float(centred.loss) - float(without_l2.loss), expected_l2, rtol=1e-4)


def test_the_energy_l2_term_can_leave_the_samples_free(batch):
    logits_data, logits_sample, _, labels = batch
    kwargs = dict(logits_sample=logits_sample, px_weight=1.0, energy_l2_center=-3.0)
    e_data = -_logsumexp(logits_data.astype(np.float64))
    data_only = jem_objective(labels, logits_data, energy_l2_weight=0.1, energy_l2_samples=False, **kwargs)
    without_l2 = jem_objective(labels, logits_data, energy_l2_weight=0.0, **kwargs)
    np.testing.assert_allclose(float(data_only.loss) - float(without_l2.loss), 0.1 * np.mean((e_data + 3.0) ** 2),
                               rtol=1e-4)
    # The samples' energies get no gradient from the L2 term: their gradient is the contrastive term's alone.
    samples = tf.constant(logits_sample)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(samples)
        free = jem_objective(labels, logits_data, logits_sample=samples, px_weight=1.0, energy_l2_weight=0.1,
                             energy_l2_center=-3.0, energy_l2_samples=False).loss
        contrastive = jem_objective(labels, logits_data, logits_sample=samples, px_weight=1.0).loss
    np.testing.assert_allclose(tape.gradient(free, samples).numpy(), tape.gradient(contrastive, samples).numpy(),
                               rtol=1e-5, atol=1e-7)


def test_plain_classifier_is_the_cross_entropy_alone(batch):
    logits_data, _, _, labels = batch
    terms = jem_objective(labels, logits_data, px_weight=0.0, energy_l2_weight=0.0)
    np.testing.assert_allclose(float(terms.loss), _ce(logits_data.astype(np.float64), labels).mean(), rtol=1e-5)
    assert terms.e_sample is None and terms.energy_gap is None


def test_gated_energy_terms_contribute_nothing_until_active(batch):
    logits_data, logits_sample, _, labels = batch
    kwargs = dict(logits_sample=logits_sample, px_weight=1.0, energy_l2_weight=0.5)
    off = jem_objective(labels, logits_data, energy_active=tf.constant(False), **kwargs)
    on = jem_objective(labels, logits_data, energy_active=tf.constant(True), **kwargs)
    always = jem_objective(labels, logits_data, **kwargs)
    np.testing.assert_allclose(float(off.loss), float(off.ce), rtol=1e-6)
    np.testing.assert_allclose(float(on.loss), float(always.loss), rtol=1e-6)
    assert float(on.loss) != pytest.approx(float(off.loss))


def test_sample_weight_is_a_weighted_mean_of_the_cross_entropy(batch):
    logits_data, _, _, labels = batch
    weights = np.array([1, 0, 2, 0, 1, 0], np.float32)
    terms = jem_objective(labels, logits_data, px_weight=0.0, sample_weight=weights)
    ce = _ce(logits_data.astype(np.float64), labels)
    np.testing.assert_allclose(float(terms.ce), np.sum(ce * weights) / weights.sum(), rtol=1e-5)
    # Rows of weight 0 do not reach it: changing their labels changes nothing.
    other = labels.copy()
    other[weights == 0] = (other[weights == 0] + 1) % 4
    again = jem_objective(other, logits_data, px_weight=0.0, sample_weight=weights)
    np.testing.assert_allclose(float(again.ce), float(terms.ce), rtol=1e-6)


def test_missing_sample_logits_are_an_error(batch):
    logits_data, _, _, labels = batch
    with pytest.raises(ValueError, match="logits_sample"):
        jem_objective(labels, logits_data, px_weight=1.0)
    with pytest.raises(ValueError, match="logits_conditional_sample"):
        jem_objective(labels, logits_data, px_weight=0.0, pxy_weight=1.0)


def test_label_smoothing_trains_on_smoothed_targets(batch):
    logits_data, _, _, labels = batch
    smoothing, classes = 0.2, logits_data.shape[1]
    d = logits_data.astype(np.float64)
    log_p = d - _logsumexp(d)[:, None]
    targets = np.full_like(d, smoothing / classes)
    targets[np.arange(len(labels)), labels] += 1 - smoothing
    expected = -(targets * log_p).sum(axis=1).mean()
    terms = jem_objective(labels, logits_data, px_weight=0.0, label_smoothing=smoothing)
    np.testing.assert_allclose(float(terms.ce), expected, rtol=1e-5)
    np.testing.assert_allclose(float(terms.loss), expected, rtol=1e-5)
    plain = jem_objective(labels, logits_data, px_weight=0.0, label_smoothing=0.0)
    np.testing.assert_allclose(float(plain.ce), _ce(d, labels).mean(), rtol=1e-5)
