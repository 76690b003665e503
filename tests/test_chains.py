import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_jem

from jem_tf import JEM, SGLDSampler
from jem_tf.model.chains import ContrastiveBatch, TrainingChains


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, 0.5, (n, 8, 8, 1)).astype("float32")
    return tf.constant(x), tf.constant(rng.integers(0, 3, n).astype("int32"))


@pytest.mark.integration
def test_sample_gives_noisy_data_and_chains_written_back_to_the_buffer():
    model = tiny_jem(pxy_weight=1.0, data_noise_std=0.03)
    before = model.replay_buffer.samples.numpy().copy()
    x, y = _batch()
    batch = TrainingChains(model).sample(x, y)
    assert [int(t.shape[0]) for t in (batch.data, batch.sample, batch.conditional_sample)] == [8, 8, 8]
    assert [g.shape for g in batch.grad_norms] == [(3,), (3,)]  # one trace per group of chains, n_steps long
    noise = (batch.data - x).numpy()
    assert 0.02 < noise.std() < 0.04 and abs(noise.mean()) < 0.01  # x + 0.03 * N(0, I)
    written = np.any(model.replay_buffer.samples.numpy() != before, axis=(1, 2, 3))
    assert 0 < written.sum() <= 16  # at most the 8 + 8 drawn slots moved


@pytest.mark.integration
def test_a_semi_supervised_batch_runs_one_px_chain_per_unlabelled_row():
    chains = TrainingChains(tiny_jem())
    x, y = _batch()
    weights = tf.constant([1, 0, 1, 0, 0, 1, 1, 1], tf.float32)
    assert int(chains.sample(x, y, weights).sample.shape[0]) == 3
    assert int(chains.sample(x, y, tf.ones([8])).sample.shape[0]) == 8  # no unlabelled row: one chain per row


def test_energy_terms_are_gated_until_energy_start_step():
    assert TrainingChains(tiny_jem()).energy_active() is None
    gated = TrainingChains(tiny_jem(energy_start_step=2))
    assert not bool(gated.energy_active())
    gated.model.optimizer.iterations.assign(2)
    assert bool(gated.energy_active())


def test_forward_keeps_batch_norm_statistics_away_from_the_chains():
    backbone = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.BatchNormalization(momentum=0.5),
                                 keras.layers.Flatten(), keras.layers.Dense(3)])
    model = JEM(backbone, buffer_size=16, sampler=SGLDSampler(n_steps=1))
    chains = TrainingChains(model)
    assert chains.has_batch_norm and not TrainingChains(tiny_jem()).has_batch_norm
    x, _ = _batch()
    logits = chains.forward(ContrastiveBatch(data=x, conditional_sample=tf.ones_like(x)))
    assert logits.data.shape == logits.conditional_sample.shape == (8, 3) and logits.sample is None
    moving_mean = backbone.layers[0].moving_mean.numpy()
    np.testing.assert_allclose(moving_mean, 0.5 * np.mean(x.numpy()), rtol=1e-4)  # the data's mean only


@pytest.mark.parametrize("px_weight, pxy_weight, groups", [(1.0, 0.0, 2), (0.0, 1.0, 2), (0.0, 0.0, 1)])
def test_sample_runs_only_the_chains_of_the_active_terms(px_weight, pxy_weight, groups):
    model = tiny_jem(px_weight=px_weight, pxy_weight=pxy_weight)
    batch = TrainingChains(model).sample(*_batch())
    assert len(batch.chains) == len(batch.grad_norms) == groups - 1
    assert (batch.sample is not None) == (px_weight > 0) and (batch.conditional_sample is not None) == (pxy_weight > 0)
