"""Performance options keep the semantics: mixed precision keeps SGLD in float32, steps_per_execution
gives the same training, and the train step is traced once."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_jem

from jem_tf import JEM, SGLDSampler, small_cnn, train
from jem_tf.networks import wide_resnet, with_precision


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_with_precision_keeps_weights_float32_head_and_float32_input_gradients(precision, tmp_path):
    net = wide_resnet(depth=10, width=1, input_shape=(8, 8, 3), seed=0)
    mixed = with_precision(net, precision)
    assert mixed.layers[-1].dtype_policy.name == "float32"  # the logits head
    assert {layer.dtype_policy.name for layer in mixed.layers[1:-1]} == {precision}
    assert all(w.dtype == "float32" for w in mixed.weights)
    for a, b in zip(net.get_weights(), mixed.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype("float32"))
    np.testing.assert_allclose(mixed(x).numpy(), net(x).numpy(), atol=0.05)
    with tf.GradientTape() as tape:
        tape.watch(x)
        energy = -tf.reduce_sum(tf.reduce_logsumexp(mixed(x), axis=1))
    assert mixed(x).dtype == tf.float32 and tape.gradient(energy, x).dtype == tf.float32
    mixed.save(tmp_path / "mixed.keras")
    restored = keras.models.load_model(tmp_path / "mixed.keras")
    assert restored.layers[1].dtype_policy.name == precision
    assert with_precision(net, "float32") is net
    with pytest.raises(ValueError, match="precision"):
        with_precision(net, "float8")


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


@pytest.mark.parametrize("argv, message", [
    (["--steps-per-execution", "4"], "steps_per_execution (4) must divide the 21 training steps per epoch"),
    (["--precision", "float8"], "precision must be one of"),
])
def test_cli_rejects_bad_performance_options(tmp_path, capsys, argv, message):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        code = train.main(argv + ["--epochs", "1", "--workdir", str(workdir)])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not os.path.exists(workdir)
