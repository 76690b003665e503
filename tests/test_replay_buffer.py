"""jem_tf.sampling.replay_buffer: the chains' slots, draws, restarts, storage and size warning."""

import warnings

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from jem_tf import ReplayBuffer
from jem_tf.sampling import replay_buffer


def test_initialised_uniform_in_value_range():
    buffer = ReplayBuffer(image_shape=(4, 4, 1), size=500, seed=0)
    values = buffer.samples.numpy()
    assert values.shape == (500, 4, 4, 1) and values.dtype == np.float32
    assert values.min() >= -1 and values.max() <= 1
    assert abs(values.mean()) < 0.02 and abs(values.std() - 2 / np.sqrt(12)) < 0.01
    assert not buffer.trainable_weights and len(buffer.non_trainable_weights) == 1


def test_restart_frequency_is_restart_prob():
    buffer = ReplayBuffer(image_shape=(2,), size=1000, restart_prob=0.05, seed=0)
    buffer.samples.assign(tf.fill([1000, 2], 5.0))  # outside [-1, 1], so restarts are visible
    restarted = 0
    draws = 200
    for i in range(draws):
        draw = buffer.draw(100, seed=[i, 1])
        fresh = np.all(np.abs(draw.x.numpy()) <= 1, axis=1)
        np.testing.assert_array_equal(fresh, draw.restarted.numpy())
        restarted += int(fresh.sum())
    # 20,000 Bernoulli(0.05) draws: a two-sided binomial test must not reject at 1e-3.
    assert stats.binomtest(restarted, draws * 100, 0.05).pvalue > 1e-3
    assert 0.04 < restarted / (draws * 100) < 0.06


def test_update_changes_only_drawn_slots_in_place():
    buffer = ReplayBuffer(image_shape=(3, 3, 1), size=50, seed=1)
    before = buffer.samples.numpy().copy()
    variable = buffer.samples.value
    draw = buffer.draw(8, seed=[3, 4])
    buffer.update(draw.indices, tf.fill([8, 3, 3, 1], 0.5))
    after = buffer.samples.numpy()
    drawn = np.unique(draw.indices.numpy())
    untouched = np.setdiff1d(np.arange(50), drawn)
    np.testing.assert_array_equal(after[untouched], before[untouched])
    np.testing.assert_array_equal(after[drawn], 0.5)
    assert buffer.samples.value is variable  # same variable: updated in place, not replaced


def test_draw_is_deterministic_per_seed():
    buffer = ReplayBuffer(image_shape=(2,), size=100, seed=0)
    a, b = buffer.draw(10, seed=[1, 2]), buffer.draw(10, seed=[1, 2])
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(buffer.draw(10, seed=[1, 3]).indices, a.indices)


def test_class_conditional_slots():
    buffer = ReplayBuffer(image_shape=(2,), size=100, num_classes=4, seed=0)
    assert buffer.slots_per_class == 25
    labels = tf.constant([0, 1, 2, 3] * 50)
    draw = buffer.draw(200, seed=[0, 0], labels=labels)
    np.testing.assert_array_equal(draw.indices.numpy() // 25, labels.numpy())
    with pytest.raises(ValueError, match="num_classes"):
        ReplayBuffer(image_shape=(2,), size=10).draw(2, seed=[0, 0], labels=tf.constant([0, 1]))


def test_reset_refills_with_noise():
    buffer = ReplayBuffer(image_shape=(2,), size=100, seed=0)
    buffer.samples.assign(tf.fill([100, 2], 5.0))
    buffer.reset(seed=[0, 9])
    assert np.abs(buffer.samples.numpy()).max() <= 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"size": 0}, "size"), ({"restart_prob": 1.5}, "restart_prob"), ({"num_classes": 0}, "num_classes"),
     ({"value_range": (1, -1)}, "value_range"), ({"image_shape": (0, 2)}, "image_shape"),
     ({"storage": "float16"}, "storage")],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"image_shape": (2,), "size": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ReplayBuffer(**args)


def test_uint8_storage_is_4x_smaller_and_dequantises_within_one_level(tmp_path):
    level = 2.0 / 256
    compact = ReplayBuffer(image_shape=(4, 4, 3), size=200, seed=0, storage="uint8")
    full = ReplayBuffer(image_shape=(4, 4, 3), size=200, seed=0)
    assert compact.samples.dtype == "uint8"
    assert full.samples.numpy().nbytes == 4 * compact.samples.numpy().nbytes
    indices = tf.range(10)
    x = np.linspace(-1.3, 1.3, 10 * 48, dtype="float32").reshape(10, 4, 4, 3)  # partly outside [-1, 1]
    compact.update(indices, x)
    stored = compact.read(indices).numpy()
    np.testing.assert_allclose(stored, np.clip(x, -1, 1), atol=level / 2 + 1e-6)  # centres of the levels
    # Draws add uniform noise within each level, deterministically per seed.
    draw = compact.draw(64, seed=[3, 4])
    kept = ~draw.restarted.numpy()
    centres = compact.read(draw.indices).numpy()[kept]
    offsets = draw.x.numpy()[kept] - centres
    assert np.abs(offsets).max() <= level / 2 + 1e-6 and np.abs(offsets).min() < level / 10
    np.testing.assert_array_equal(draw.x.numpy(), compact.draw(64, seed=[3, 4]).x.numpy())
    compact.reset(seed=[5, 6])
    chains = compact.chains().numpy()
    assert chains.shape == (200, 4, 4, 3) and chains.min() >= -1 and chains.max() <= 1
    assert abs(chains.mean()) < 0.05


def test_jem_with_uint8_buffer_trains_saves_and_restores(tmp_path):
    import keras
    from conftest import tiny_jem

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 64).astype("int32")
    model = tiny_jem(buffer_storage="uint8")
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    assert restored.replay_buffer.storage == "uint8"
    np.testing.assert_array_equal(restored.replay_buffer.samples.numpy(), model.replay_buffer.samples.numpy())
    assert model.sample(4, n_steps=0, init="buffer").dtype == np.float32


def test_a_huge_replay_buffer_is_announced_before_it_is_allocated(monkeypatch):
    monkeypatch.setattr(replay_buffer, "LARGE_BUFFER_BYTES", 1000)
    with pytest.warns(UserWarning, match=r"takes 0\.0 GiB.*buffer_storage='uint8'"):
        replay_buffer.ReplayBuffer(image_shape=(8, 8, 1), size=16, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay_buffer.ReplayBuffer(image_shape=(8, 8, 1), size=3, seed=0)  # 768 bytes: quiet
