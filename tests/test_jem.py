"""jem_tf.model.jem: the JEM: training, metrics, saving, sampling, XLA, a user's own classifier."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CHAIN_TOLERANCE, tiny_jem, users_classifier

from jem_tf import JEM, SGLDSampler, small_cnn
from jem_tf.data import load_digits
from jem_tf.model import energy as energy_lib
from jem_tf.networks import with_precision


def _weights_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


@pytest.mark.integration
def test_fit_on_numpy_and_dataset_tracks_jem_metrics(tiny_data):
    x, y = tiny_data
    model = tiny_jem()
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert set(history.history) == {"loss", "ce", "accuracy", "e_data", "e_sample", "energy_gap", "sgld_grad_norm",
                                   "sample_abs_max"}
    assert history.history["ce"][-1] < history.history["ce"][0]
    assert int(model.optimizer.iterations) == 6
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    model.fit(dataset, epochs=1, verbose=0)
    results = model.evaluate(x, y, return_dict=True, verbose=0)
    assert set(results) == {"loss", "ce", "accuracy", "e_data"}
    np.testing.assert_allclose(results["e_data"], np.mean(model.energy(x)), rtol=1e-4)


def test_compile_metrics_are_computed_on_the_logits_in_fit_and_evaluate(tiny_data):
    x, y = tiny_data
    model = tiny_jem()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  metrics=[keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent"),
                           keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")])
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0, validation_data=(x[:32], y[:32])).history
    assert {"xent", "top2", "val_xent", "val_top2", "ce", "energy_gap"} <= set(history)
    results = model.evaluate(x, y, return_dict=True, verbose=0)
    assert set(results) == {"loss", "ce", "accuracy", "e_data", "xent", "top2"}
    np.testing.assert_allclose(results["xent"], results["ce"], rtol=1e-5)  # the same cross-entropy, of the logits
    logits = model.predict(x, verbose=0)
    top2 = np.argsort(logits, axis=1)[:, -2:]
    np.testing.assert_allclose(results["top2"], np.mean([label in row for label, row in zip(y, top2)]), atol=1e-6)


def test_summary_tells_the_replay_buffer_apart_from_the_weights(tiny_data):
    model = tiny_jem(buffer_size=40)
    lines = []
    model.summary(print_fn=lambda line, line_break=True: lines.append(line))
    assert lines[-1].startswith(f" Of the non-trainable params, {40 * 64:,} ")
    assert "40 SGLD chains of 8x8x1 images" in lines[-1]
    assert f"the network has {model.backbone.count_params():,} params" in lines[-1]


@pytest.mark.integration
def test_keras_export_serves_the_logits_after_fit_and_after_loading(tiny_data, tmp_path):
    x, y = tiny_data
    model = tiny_jem(buffer_size=500)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.export(str(tmp_path / "fitted"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "fitted"))
    np.testing.assert_allclose(served.serve(x[:8]).numpy(), model.predict(x[:8], verbose=0), atol=1e-5)
    stored = sum(os.path.getsize(tmp_path / "fitted" / "variables" / f)
                 for f in os.listdir(tmp_path / "fitted" / "variables"))
    assert stored < model.replay_buffer.samples.numpy().nbytes  # the network only: not the buffer
    model.save(str(tmp_path / "jem.keras"))
    loaded = keras.models.load_model(str(tmp_path / "jem.keras"))
    loaded.export(str(tmp_path / "loaded"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "loaded"))  # kept: a function of a collected object loses its variables
    np.testing.assert_allclose(served.serve(x[:8]).numpy(), model.predict(x[:8], verbose=0), atol=1e-5)
    archive = keras.export.ExportArchive()  # Keras's lower-level API, with the JEM's own call
    archive.track(loaded)
    archive.add_endpoint("logits", loaded.call, input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32)])
    archive.write_out(str(tmp_path / "archive"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "archive"))
    np.testing.assert_allclose(served.logits(x[:8]).numpy(), model.predict(x[:8], verbose=0), atol=1e-5)


@pytest.mark.integration
def test_learns_real_digits_from_600_images():
    data = load_digits(seed=0)
    backbone = small_cnn(num_classes=10, input_shape=(8, 8, 1), width=8, seed=0)
    model = JEM(backbone, sampler=SGLDSampler(n_steps=5), buffer_size=500, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(data.x_train[:600], data.y_train[:600], batch_size=32, epochs=8, verbose=0)
    # Measured 0.85-0.91 over seeds 0-2 (chance is 0.1).
    assert model.evaluate(data.x_test, data.y_test, return_dict=True, verbose=0)["accuracy"] > 0.75


def test_train_step_loss_matches_its_definition(tiny_data):
    # Recompute the step's loss from the same inputs: CE + (mean E(data) - mean E(samples)) + l2.
    x, y = tiny_data
    x, y = x[:16], y[:16]
    model = tiny_jem(data_noise_std=0.0, energy_l2_weight=0.5, sampler=SGLDSampler(n_steps=1, noise_std=0.0))
    buffer_before = model.replay_buffer.samples.numpy().copy()
    weights_before = model.get_weights()
    logs = model.train_on_batch(x, y, return_dict=True)
    # Which chains were drawn: the slots that changed.
    changed = np.any(model.replay_buffer.samples.numpy() != buffer_before, axis=(1, 2, 3))
    assert 0 < changed.sum() <= 16
    clone = tiny_jem(data_noise_std=0.0, energy_l2_weight=0.5)
    clone.set_weights(weights_before)
    logits = clone.backbone(x).numpy()
    ce = float(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True).numpy().mean())
    np.testing.assert_allclose(logs["ce"], ce, rtol=1e-5)
    e_data = energy_lib.energy(logits).numpy()
    np.testing.assert_allclose(logs["e_data"], e_data.mean(), rtol=1e-5)
    expected = ce + logs["energy_gap"] + 0.5 * (np.mean(e_data ** 2) + logs["e_sample"] ** 2)
    # mean(E(samples)^2) >= mean(E)^2, so the loss is at least this; equal up to the sample spread.
    assert logs["loss"] >= expected - 1e-4
    np.testing.assert_allclose(logs["energy_gap"], logs["e_data"] - logs["e_sample"], rtol=1e-5, atol=1e-6)


def test_plain_classifier_mode_runs_no_sampler(tiny_data):
    x, y = tiny_data
    model = tiny_jem(px_weight=0.0)
    buffer_before = model.replay_buffer.samples.numpy().copy()
    logs = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert "e_sample" not in logs and not model.samples_contrastive
    np.testing.assert_array_equal(model.replay_buffer.samples.numpy(), buffer_before)


@pytest.mark.integration  # 1.7-1.9 s of CPU: near the default tier's 2 s limit
def test_class_conditional_term_uses_per_class_buffer(tiny_data):
    x, y = tiny_data
    model = tiny_jem(pxy_weight=1.0, buffer_size=30)
    assert model.replay_buffer.num_classes == 3
    logs = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][-1])
    samples = model.sample(6, seed=0, labels=[0, 1, 2, 0, 1, 2], n_steps=2)
    assert samples.shape == (6, 8, 8, 1)
    with pytest.raises(ValueError, match="class_conditional_buffer"):
        tiny_jem(pxy_weight=1.0, class_conditional_buffer=False)


@pytest.mark.integration
def test_same_seed_same_training(tiny_data):
    x, y = tiny_data
    a, b = tiny_jem(seed=4), tiny_jem(seed=4)
    for model in (a, b):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert _weights_equal(a, b)
    c = tiny_jem(seed=5)
    c.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert not _weights_equal(a, c)


def test_sampler_runs_in_inference_mode_batchnorm_untouched_by_samples(tiny_data):
    x, y = tiny_data
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = keras.layers.BatchNormalization()(h)
    logits = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h))
    backbone = keras.Model(inputs, logits)
    model = JEM(backbone, sampler=SGLDSampler(n_steps=2), buffer_size=32, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # lr 0: only BN statistics can change
    bn = backbone.layers[2]
    model.train_on_batch(x[:32], y[:32])
    # Moving mean = 0.99 * 0 + 0.01 * (batch mean of the data features only).
    features = backbone.layers[1](x[:32] + 0.0).numpy()
    data_mean = features.mean(axis=(0, 1, 2))
    # Noise sigma 0.03 on inputs moves the mean a little; samples (uniform noise) would move it a lot.
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.01 * data_mean, atol=2e-3)


@pytest.mark.integration
def test_keras_round_trip_keeps_buffer_optimizer_and_resumes_identically(tiny_data, tmp_path):
    x, y = tiny_data
    model = tiny_jem(pxy_weight=0.5, buffer_size=30, energy_l2_weight=0.1, energy_l2_samples=False,
                     label_smoothing=0.1)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / "jem.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, JEM)
    config, loaded_config = model.get_config(), loaded.get_config()
    config.pop("backbone"), loaded_config.pop("backbone")
    assert loaded_config == config and loaded.energy_l2_samples is False and loaded.label_smoothing == 0.1
    assert [layer.name for layer in loaded.backbone.layers] == [layer.name for layer in model.backbone.layers]
    np.testing.assert_array_equal(loaded.replay_buffer.samples.numpy(), model.replay_buffer.samples.numpy())
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 3
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    # Continue training both: bit-identical weights and buffers.
    for m in (model, loaded):
        m.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
    assert _weights_equal(model, loaded)
    np.testing.assert_array_equal(loaded.replay_buffer.samples.numpy(), model.replay_buffer.samples.numpy())


def test_sample_is_deterministic_and_lowers_energy(evaluation_jem):
    model = evaluation_jem[0]  # conftest's tiny JEM, trained once per test run; sampling leaves it unchanged
    a = model.sample(16, seed=3, n_steps=10)
    np.testing.assert_array_equal(a, model.sample(16, seed=3, n_steps=10))
    start = model.sample(16, seed=3, n_steps=0)
    assert start.min() >= -1 and start.max() <= 1
    assert np.mean(model.energy(a)) < np.mean(model.energy(start))
    buffer_view = model.sample(8, seed=0, init="buffer", n_steps=0)
    assert any(np.allclose(buffer_view[0], row) for row in model.replay_buffer.samples.numpy())


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((4, 8, 8), "float32"), np.zeros(4), "shape"),
        (np.zeros((4, 8, 8, 3), "float32"), np.zeros(4), "shape"),
        (np.full((4, 8, 8, 1), 255.0, "float32"), np.zeros(4), r"\[-1.0, 1.0\].*255"),
        (np.zeros((4, 8, 8, 1), "float32"), np.array([0, 1, 2, 3]), "label 3"),
        (np.zeros((4, 8, 8, 1), "float32"), np.array([0, -1, 0, 0]), "label -1"),
        (np.zeros((4, 8, 8, 1), "float32"), np.array([0.5, 1, 0, 0]), "label 0.5"),
        (np.full((4, 8, 8, 1), np.nan, "float32"), np.zeros(4), "NaN"),
    ],
)
def test_bad_numpy_inputs_raise_value_error(images, labels, match):
    with pytest.raises(ValueError, match=match):
        tiny_jem().fit(images, labels, batch_size=2, epochs=1, verbose=0)


def test_bad_dataset_inputs_raise_in_graph():
    model = tiny_jem()
    images = tf.data.Dataset.from_tensor_slices((np.full((4, 8, 8, 1), 3.0, "float32"), np.zeros(4, "int32")))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"must lie in \[-1.0, 1.0\]"):
        model.fit(images.batch(2), epochs=1, verbose=0)
    labels = tf.data.Dataset.from_tensor_slices((np.zeros((4, 8, 8, 1), "float32"), np.full(4, 7, "int32")))
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes=3"):
        model.fit(labels.batch(2), epochs=1, verbose=0)
    wrong_rank = tf.data.Dataset.from_tensor_slices((np.zeros((4, 8, 8), "float32"), np.zeros(4, "int32")))
    with pytest.raises(ValueError, match="rank 4"):
        model.fit(wrong_rank.batch(2), epochs=1, verbose=0)


@pytest.mark.parametrize("kwargs, match", [({"px_weight": -1.0}, "px_weight"), ({"value_range": (1, 0)}, "value_range"),
                                           ({"sampler": "sgld"}, "sampler"), ({"seed": 1.5}, "seed"),
                                           ({"energy_l2_samples": "no"}, "energy_l2_samples"),
                                           ({"label_smoothing": 1.0}, r"label_smoothing=1\.0")])
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JEM(small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4), **kwargs)


@pytest.mark.integration  # 1.7-1.9 s of CPU: near the default tier's 2 s limit
def test_energy_start_step_trains_a_plain_classifier_first(tiny_data):
    """Before energy_start_step only the cross-entropy counts and the chains take no SGLD step; from it on
    the JEM objective runs."""
    x, y = tiny_data
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)  # 3 steps per epoch
    warm = tiny_jem(energy_start_step=3, energy_l2_weight=0.1)
    classifier = tiny_jem(px_weight=0.0)
    buffer_before = warm.replay_buffer.samples.numpy().copy()
    logs = warm.fit(batches, epochs=1, verbose=0).history
    classifier.fit(batches, epochs=1, verbose=0)
    for a, b in zip(warm.backbone.get_weights(), classifier.backbone.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert logs["sgld_grad_norm"][0] == 0.0  # no SGLD step was taken
    # Chains were only drawn and written back (restarted ones from their start): no slot moved by SGLD.
    moved = np.any(warm.replay_buffer.samples.numpy() != buffer_before, axis=(1, 2, 3)).sum()
    assert moved <= 0.15 * 3 * 32
    warm.fit(batches, epochs=1, verbose=0)
    classifier.fit(batches, epochs=1, verbose=0)
    assert not np.allclose(warm.backbone.get_weights()[0], classifier.backbone.get_weights()[0], atol=1e-5)
    assert np.any(warm.replay_buffer.samples.numpy() != buffer_before, axis=(1, 2, 3)).sum() > moved
    assert JEM.from_config(warm.get_config()).energy_start_step == 3
    with pytest.raises(ValueError, match="energy_start_step"):
        tiny_jem(energy_start_step=-1)


@pytest.mark.integration
def test_mixed_bfloat16_jem_trains_with_float32_chains(tiny_data):
    x, y = tiny_data
    backbone = with_precision(small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1, seed=0),
                              "mixed_bfloat16")
    model = JEM(backbone, sampler=SGLDSampler(n_steps=3), buffer_size=64, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.replay_buffer.samples.dtype == "float32"
    assert model.sample(4, n_steps=2).dtype == np.float32


def test_train_step_is_traced_once():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (96, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 96).astype("int32")
    model = tiny_jem()
    model.fit(x, y, batch_size=32, epochs=3, verbose=0)  # 9 steps, 3 epochs
    assert model.train_step_trace_count == 1


@pytest.mark.integration
def test_steps_per_execution_gives_the_same_training():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (96, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 96).astype("int32")
    weights = []
    for steps_per_execution in (1, 3):
        model = tiny_jem()
        model.compile(optimizer=keras.optimizers.Adam(1e-3), steps_per_execution=steps_per_execution)
        model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
        weights.append(model.get_weights())
        assert int(model.optimizer.iterations.numpy()) == 6
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("pxy_weight", [0.0, 1.0])
def test_unlabelled_rows_never_reach_the_label_terms(tiny_data, pxy_weight):
    x, y = tiny_data
    x, y = x[:32], y[:32]
    weights = (np.arange(32) % 4 == 0).astype("float32")  # 8 labelled rows, 24 unlabelled
    wrong = np.where(weights > 0, y, (y + 1) % 3).astype("int32")  # deliberately wrong labels where unlabelled
    results = []
    for labels in (y, wrong):
        model = tiny_jem(data_noise_std=0.0, restart_prob=0.0, pxy_weight=pxy_weight,
                         sampler=SGLDSampler(n_steps=2, noise_std=0.0))
        logs = model.train_on_batch(x, labels, sample_weight=weights, return_dict=True)
        results.append((logs, [v.numpy() for v in model.trainable_variables]))
    (logs_a, weights_a), (logs_b, weights_b) = results
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert logs_a["ce"] == pytest.approx(logs_b["ce"], rel=1e-6)
    # And the labels of the labelled rows do matter (the test would notice if nothing were used).
    flipped = np.where(weights > 0, (y + 1) % 3, y).astype("int32")
    model = tiny_jem(data_noise_std=0.0, restart_prob=0.0, pxy_weight=pxy_weight,
                     sampler=SGLDSampler(n_steps=2, noise_std=0.0))
    assert model.train_on_batch(x, flipped, sample_weight=weights, return_dict=True)["ce"] != \
        pytest.approx(logs_a["ce"], rel=1e-3)


@pytest.mark.integration
def test_a_users_sequential_classifier_trains_samples_and_scores(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96).astype("int32")
    x = np.clip(rng.uniform(-1, 1, (96, 8, 8, 1)) * 0.3 + (y[:, None, None, None] - 1) * 0.6, -1, 1).astype("float32")
    model = JEM(users_classifier(), buffer_size=64, sampler=SGLDSampler(n_steps=2), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"][-1]) and model.image_shape == (8, 8, 1) and model.num_classes == 3
    # energy / log_px: numpy arrays like predict, computed in batches (any batch size gives the same values).
    energies = model.energy(x, batch_size=7)
    assert isinstance(energies, np.ndarray) and energies.shape == (96,) and energies.dtype == np.float32
    np.testing.assert_allclose(energies, model.energy(x, batch_size=96), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.log_px(x), -energies, rtol=1e-5, atol=1e-6)
    assert model.sample(4, seed=0, n_steps=2).shape == (4, 8, 8, 1)
    model.save(tmp_path / "mine.keras")
    assert isinstance(keras.models.load_model(tmp_path / "mine.keras"), JEM)


# XLA's float random kernels draw other numbers than TensorFlow's for the same stateless seed (integer draws
# agree), so the comparison runs without float randomness: no data noise, noiseless SGLD, no restarts. What
# is left differs by the order of floating-point operations only.
DETERMINISTIC = dict(data_noise_std=0.0, restart_prob=0.0, sampler=SGLDSampler(n_steps=3, step_size=0.2, noise_std=0.0))

# The stated tolerance of XLA against the default kernels after 6 training steps (weights, losses): the two
# compile the same maths into different fused kernels, and each step's SGLD chains feed the differences back
# (an input gradient through a leaky ReLU changes branch when a pre-activation changes sign); TensorFlow's
# multithreaded CPU reductions are not bit-reproducible either, so even one step differs by ~1e-4.
TOLERANCE = dict(rtol=1e-3, atol=5e-4)


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


@pytest.mark.integration
@pytest.mark.parametrize("jit_compile", [True, False])
def test_train_on_batch_and_fit_on_tensors_are_checked_under_xla_as_without(tiny_data, jit_compile):
    import keras
    import tensorflow as tf
    from conftest import tiny_jem

    x, y = tiny_data
    model = tiny_jem()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    initial = model.backbone.get_weights()
    errors = (ValueError, tf.errors.InvalidArgumentError)  # eager check / in-graph check (without XLA)
    bright, nan = tf.constant(np.full_like(x[:32], 5.0)), tf.constant(np.full_like(x[:32], np.nan))
    labels, bad_labels = tf.constant(y[:32]), tf.constant(np.full_like(y[:32], 7))
    for call in (lambda: model.train_on_batch(bright, labels),
                 lambda: model.train_on_batch(np.full_like(x[:32], 5.0), y[:32]),
                 lambda: model.train_on_batch(tf.constant(x[:32]), bad_labels),
                 lambda: model.fit(bright, labels, epochs=1, verbose=0),
                 lambda: model.fit(nan, labels, epochs=1, verbose=0),
                 lambda: model.test_on_batch(bright, labels)):
        with pytest.raises(errors, match=r"(?i)lie in \[-1.0, 1.0\]|NaN|Labels must be"):
            call()
    for before, after in zip(initial, model.backbone.get_weights()):  # no step trained on bad data
        np.testing.assert_array_equal(before, after)
    if jit_compile:  # checked before Keras is called: not even the step counter moved
        assert int(model.optimizer.iterations.numpy()) == 0
