"""jem_tf.model.chains: a training step's sampling half: noisy data, the p(x) and p(x|y) chains."""


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


@pytest.mark.integration
def test_p_x_chains_run_for_the_unlabelled_rows_only(tiny_data):
    """A semi-supervised batch runs one p(x) chain per unlabelled row (the labelled rows feed the cross-entropy
    and are among the unlabelled images of an epoch); a batch without weight-0 rows runs one per row."""
    x, y = tiny_data
    x, y = x[:32], y[:32]

    def rewritten_slots(weights):
        model = tiny_jem(buffer_size=100_000, restart_prob=0.0, sampler=SGLDSampler(n_steps=1, noise_std=0.0))
        model.build((None, 8, 8, 1))
        before = model.replay_buffer.samples.numpy()
        model.train_on_batch(x, y, sample_weight=weights)
        changed = np.any(model.replay_buffer.samples.numpy() != before, axis=(1, 2, 3))
        return int(changed.sum())

    labelled = (np.arange(32) % 4 == 0).astype("float32")  # 8 labelled rows, 24 unlabelled
    # Chains are drawn with replacement from 100,000 slots, so (almost surely) one slot per chain.
    assert rewritten_slots(labelled) == 24
    assert rewritten_slots(np.ones(32, "float32")) == 32
    assert rewritten_slots(None) == 32


@pytest.mark.integration
@pytest.mark.parametrize("px_weight", [0.0, 1.0])
def test_unlabelled_rows_never_draw_or_write_class_conditional_chains(tiny_data, px_weight):
    from conftest import tiny_jem

    from jem_tf import SGLDSampler

    x, y = tiny_data
    x = x[:32]
    weights = (np.arange(32) % 4 == 0).astype("float32")  # 8 labelled rows (classes 1 and 2), 24 unlabelled
    labelled_classes = 1 + (np.arange(32) // 4) % 2
    runs = []
    for placeholder in (0, 2):  # what the unlabelled rows carry must not matter
        labels = np.where(weights > 0, labelled_classes, placeholder).astype("int32")
        model = tiny_jem(data_noise_std=0.0, restart_prob=0.0, pxy_weight=1.0, px_weight=px_weight,
                         sampler=SGLDSampler(n_steps=2, noise_std=0.0))
        initial = model.replay_buffer.samples.numpy().copy()
        for _ in range(3):
            model.train_on_batch(x, labels, sample_weight=weights)
        runs.append((initial, model.replay_buffer.samples.numpy(), [v.numpy() for v in model.trainable_variables]))
    (initial, buffer_a, weights_a), (_, buffer_b, weights_b) = runs
    np.testing.assert_array_equal(buffer_a, buffer_b)
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    slot = 64 // 3  # slots per class (buffer 64, 3 classes): class 0 is rows [0, 21)
    changed = np.any(buffer_a != initial, axis=(1, 2, 3))
    assert changed[slot:].any()  # the labelled classes' chains were written back
    if px_weight == 0:  # only p(x|y) writes: class 0 has no labelled row, so its slots are untouched
        assert not changed[:slot].any()
