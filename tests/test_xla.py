"""The whole JEM step under XLA (jit_compile=True), on the CPU: it compiles, keeps the replay buffer's
semantics, matches TensorFlow's default kernels, and bad inputs still get the promised errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_jem

from jem_tf import SGLDSampler

# XLA's float random kernels draw other numbers than TensorFlow's for the same stateless seed (integer draws
# agree), so the comparison runs without float randomness: no data noise, noiseless SGLD, no restarts. What
# is left differs by the order of floating-point operations only.
DETERMINISTIC = dict(data_noise_std=0.0, restart_prob=0.0, sampler=SGLDSampler(n_steps=3, step_size=0.2, noise_std=0.0))
# The stated tolerance of XLA against the default kernels after 6 training steps (weights, losses): the two
# compile the same maths into different fused kernels, and each step's SGLD chains feed the differences back
# (an input gradient through a leaky ReLU changes branch when a pre-activation changes sign); TensorFlow's
# multithreaded CPU reductions are not bit-reproducible either, so even one step differs by ~1e-4.
TOLERANCE = dict(rtol=1e-3, atol=5e-4)
CHAIN_TOLERANCE = dict(rtol=0.0, atol=1e-3)  # SGLD chains from the same images and weights


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96).astype("int32")
    x = np.clip(rng.uniform(-1, 1, (96, 8, 8, 1)) * 0.3 + (y[:, None, None, None] - 1) * 0.6, -1, 1)
    return x.astype("float32"), y


def _trained(data, jit_compile, epochs=2, num=96, same_chains=False):
    x, y = data
    model = tiny_jem(**DETERMINISTIC)
    # Plain SGD: Adam's normalised steps would turn last-bit gradient differences of near-zero gradients
    # into differences of the size of the learning rate.
    model.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=jit_compile)
    if same_chains:  # every chain the same image: which chains are drawn no longer matters
        model.replay_buffer.samples.assign(np.broadcast_to(x[-1], model.replay_buffer.samples.shape))
    before = model.replay_buffer.samples.numpy().copy()
    history = model.fit(tf.data.Dataset.from_tensor_slices((x[:num], y[:num])).batch(32), epochs=epochs, verbose=0)
    return model, before, history.history


@pytest.mark.integration
def test_one_train_step_under_xla_equals_the_default_kernels(data):
    # XLA draws other random numbers than TensorFlow's kernels for the same seed, the buffer's chain indices
    # included (deterministically per seed in each mode); with identical chains the step's maths is compared.
    default, _, default_logs = _trained(data, False, epochs=1, num=32, same_chains=True)
    xla, before, xla_logs = _trained(data, True, epochs=1, num=32, same_chains=True)
    assert xla.jit_compile is True and default.jit_compile is False
    for a, b in zip(xla.trainable_variables, default.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), **TOLERANCE)
    for name in ("loss", "ce", "e_data", "e_sample", "energy_gap"):
        np.testing.assert_allclose(xla_logs[name], default_logs[name], **TOLERANCE, err_msg=name)
    # Buffer semantics in both modes: the drawn chains (at most 32 of 64), and only those, were rewritten, all with
    # the same SGLD result (they started from the same image), and that result agrees between the modes.
    written = []
    for model in (xla, default):
        after = model.replay_buffer.samples.numpy()
        changed = np.any(after != before, axis=(1, 2, 3))
        assert 0 < changed.sum() <= 32
        np.testing.assert_allclose(after[changed], np.broadcast_to(after[changed][0], after[changed].shape), atol=1e-6)
        np.testing.assert_array_equal(after[~changed], before[~changed])
        written.append(after[changed][0])
    np.testing.assert_allclose(written[0], written[1], **CHAIN_TOLERANCE)
    # Deterministic per seed under XLA too.
    again, _, _ = _trained(data, True, epochs=1, num=32, same_chains=True)
    np.testing.assert_array_equal(again.replay_buffer.samples.numpy(), xla.replay_buffer.samples.numpy())


@pytest.mark.slow
def test_xla_training_stays_within_the_stated_tolerance(data):
    default, _, default_logs = _trained(data, False, same_chains=True)
    xla, _, xla_logs = _trained(data, True, same_chains=True)
    assert int(xla.optimizer.iterations.numpy()) == 6
    for a, b in zip(xla.trainable_variables, default.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), **TOLERANCE)
    for name in ("loss", "ce", "e_data", "e_sample", "energy_gap"):
        np.testing.assert_allclose(xla_logs[name], default_logs[name], **TOLERANCE, err_msg=name)
    # Test step and predict under XLA agree with the default kernels too.
    x, y = data
    xla_eval = xla.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    default_eval = default.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    for name in ("ce", "accuracy", "e_data"):
        np.testing.assert_allclose(xla_eval[name], default_eval[name], **TOLERANCE)
    np.testing.assert_allclose(xla.predict(x, verbose=0), default.predict(x, verbose=0), **TOLERANCE)


def test_bad_inputs_still_get_the_promised_errors_under_xla(data):
    x, y = data
    model = tiny_jem(**DETERMINISTIC)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    bad_images = tf.data.Dataset.from_tensor_slices((np.full_like(x, 5.0), y)).batch(32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must lie in \[-1.0, 1.0\]"):
        model.fit(bad_images, epochs=1, verbose=0)
    bad_labels = tf.data.Dataset.from_tensor_slices((x, np.full_like(y, 7))).batch(32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Labels must be in"):
        model.fit(bad_labels, epochs=1, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN"):
        model.evaluate(tf.data.Dataset.from_tensor_slices((np.full_like(x, np.nan), y)).batch(32), verbose=0)
    with pytest.raises(ValueError, match="Images must lie in"):
        model.fit(np.full_like(x, 5.0), y, epochs=1, verbose=0)  # numpy: checked eagerly, as without XLA
    assert int(model.optimizer.iterations.numpy()) == 0  # no step ran on bad data


def test_the_sampler_and_sampling_under_xla(data):
    x, _ = data
    model = tiny_jem(sampler=SGLDSampler(n_steps=5, noise_std=0.0, jit_compile=True))
    plain = tiny_jem(sampler=SGLDSampler(n_steps=5, noise_std=0.0))
    # settings="sampler": the training sampler itself (refinement settings build their own, uncompiled one).
    np.testing.assert_allclose(model.refine(x[:8], n_steps=5, seed=1, settings="sampler"),
                               plain.refine(x[:8], n_steps=5, seed=1, settings="sampler"), **CHAIN_TOLERANCE)
    samples = model.sample(8, seed=3, n_steps=5)
    np.testing.assert_array_equal(samples, model.sample(8, seed=3, n_steps=5))  # deterministic per seed
    assert model.energy(samples).mean() < model.energy(model.sample(8, seed=3, n_steps=0)).mean()


def test_compile_defaults_and_rejected_arguments():
    model = tiny_jem()
    assert model.jit_compile is False  # tiny_jem compiles with the default: off, on every device
    with pytest.raises(ValueError, match="does not take `loss`"):
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="jit_compile"):
        model.compile(optimizer="adam", jit_compile="yes")
