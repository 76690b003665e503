"""A Keras user's own classifier (not one of jem_tf's networks) as a JEM: what works, and what cannot be a
JEM and is refused with a message that names the problem."""

import warnings

import keras
import numpy as np
import pytest

from jem_tf import JEM, SGLDSampler
from jem_tf.sampling import replay_buffer


def users_classifier(activation=None, input_shape=(8, 8, 1)):
    """A plain Sequential CNN as a user would write it."""
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation=activation),
    ])


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


@pytest.mark.parametrize("head", ["softmax", "layer"])
def test_a_softmax_head_is_refused(head):
    backbone = users_classifier("softmax") if head == "softmax" else keras.Sequential(
        [*users_classifier().layers, keras.layers.Softmax()])
    with pytest.raises(ValueError, match="ends in a softmax"):
        JEM(backbone, buffer_size=16)


def test_a_dynamic_input_shape_is_refused_unless_given():
    backbone = users_classifier(input_shape=(None, None, 1))
    with pytest.raises(ValueError, match="must be static"):
        JEM(backbone, buffer_size=16)
    assert JEM(backbone, buffer_size=16, image_shape=(8, 8, 1)).image_shape == (8, 8, 1)


def test_a_huge_replay_buffer_is_announced_before_it_is_allocated(monkeypatch):
    monkeypatch.setattr(replay_buffer, "LARGE_BUFFER_BYTES", 1000)
    with pytest.warns(UserWarning, match=r"takes 0\.0 GiB.*buffer_storage='uint8'"):
        replay_buffer.ReplayBuffer(image_shape=(8, 8, 1), size=16, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay_buffer.ReplayBuffer(image_shape=(8, 8, 1), size=3, seed=0)  # 768 bytes: quiet
