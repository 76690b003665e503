"""jem_tf.sampling.chain_init: JEM++'s class Gaussians: the buffer's fill and restarts, sampling, saving."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import separable_data, tiny_jem

from jem_tf import SGLDSampler, seeds
from jem_tf.sampling.chain_init import ClassGaussian, flat_fields, start_chains
from jem_tf.sampling.replay_buffer import ReplayBuffer
from jem_tf.serving import METADATA_FILE, export_saved_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "helpers", "serving_check.py")


def gaussian_data(n_per_class=4000, seed=0):
    """Two classes of 2x2 "images" from known Gaussians (means and covariances below)."""
    rng = np.random.default_rng(seed)
    means = np.array([[-0.5, -0.4, -0.3, -0.2], [0.3, 0.2, 0.1, 0.0]])
    a = rng.normal(size=(2, 4, 4)) * 0.1
    covariances = a @ np.transpose(a, (0, 2, 1)) + 0.001 * np.eye(4)
    x = np.concatenate([rng.multivariate_normal(means[k], covariances[k], n_per_class) for k in range(2)])
    y = np.repeat([0, 1], n_per_class).astype("int32")
    return x.reshape(-1, 2, 2, 1).astype("float32"), y, means, covariances


def test_fit_gives_each_class_its_sample_mean_and_covariance():
    x, y, _, _ = gaussian_data()
    y = y.copy()
    y[:1000] = 1  # unbalanced classes: the prior follows the labels' frequencies
    init = ClassGaussian.fit(x, y, num_classes=2)
    assert init.rank == 4 and init.is_full_rank
    flat = x.reshape(len(x), 4).astype(np.float64)
    for k in range(2):
        members = flat[y == k]
        np.testing.assert_allclose(init.means.numpy()[k], members.mean(0), atol=1e-6)
        # factor @ factor.T is the (1/N) sample covariance.
        factor = init.factors.numpy()[k].astype(np.float64)
        np.testing.assert_allclose(factor @ factor.T, np.cov(members.T, bias=True), atol=1e-6)
    np.testing.assert_allclose(np.exp(init.class_log_probs.numpy()), [3000 / 8000, 5000 / 8000], rtol=1e-6)
    np.testing.assert_array_equal(init.residual_stds.numpy(), 0.0)


@pytest.mark.integration
def test_samples_follow_each_class_gaussian_clipped_to_the_range():
    x, y, means, covariances = gaussian_data()
    init = ClassGaussian.fit(x, y, num_classes=2)
    labels = tf.constant(np.repeat([0, 1], 20000), tf.int32)
    samples = init.sample(40000, seed=[3, 4], labels=labels).numpy()
    assert samples.shape == (40000, 2, 2, 1) and samples.dtype == np.float32
    flat = samples.reshape(-1, 4)
    for k in range(2):
        part = flat[k * 20000:(k + 1) * 20000]
        np.testing.assert_allclose(part.mean(0), means[k], atol=0.01)
        np.testing.assert_allclose(np.cov(part.T), covariances[k], atol=0.005)
    np.testing.assert_array_equal(samples, init.sample(40000, seed=[3, 4], labels=labels).numpy())
    assert not np.array_equal(samples, init.sample(40000, seed=[3, 5], labels=labels).numpy())
    # Draws are clipped to the value range: a wide Gaussian never leaves it.
    wide = ClassGaussian.fit(x * 10, y, num_classes=2, value_range=(-1, 1)).sample(1000, seed=[0, 0]).numpy()
    assert wide.min() == -1.0 and wide.max() == 1.0
    # Unconditional draws take classes with the prior (here 1:1).
    draws = init.draw_labels(20000, seed=[1, 1]).numpy()
    assert set(np.unique(draws)) == {0, 1} and abs(draws.mean() - 0.5) < 0.02


def test_low_rank_plus_diagonal_keeps_every_pixel_variance():
    rng = np.random.default_rng(1)
    x = np.clip(rng.normal(size=(3000, 4, 4, 1)) * 0.3 + rng.normal(size=(3000, 1, 1, 1)) * 0.2, -1, 1)
    y = rng.integers(0, 3, 3000).astype("int32")
    init = ClassGaussian.fit(x.astype("float32"), y, num_classes=3, max_full_dim=8)  # 16 pixels > 8: low rank
    assert init.rank == 16  # min(256, D)
    init = ClassGaussian.fit(x.astype("float32"), y, num_classes=3, rank=3)
    assert init.rank == 3 and not init.is_full_rank
    flat = x.reshape(3000, 16)
    for k in range(3):
        variances = np.sum(init.factors.numpy()[k] ** 2, 1) + init.residual_stds.numpy()[k] ** 2
        np.testing.assert_allclose(variances, flat[y == k].var(0), rtol=1e-4)
    samples = init.sample(30000, seed=[0, 1], labels=tf.zeros([30000], tf.int32)).numpy().reshape(-1, 16)
    np.testing.assert_allclose(samples.var(0), flat[y == 0].var(0), rtol=0.1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=3), "at least 2 images"),
    (dict(num_classes=1), r"class ids in \[0, 1\)"),
])
def test_fit_rejects_bad_input(kwargs, message):
    x, y, _, _ = gaussian_data(50)
    with pytest.raises(ValueError, match=message):
        ClassGaussian.fit(x, y, **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        ClassGaussian.fit(np.full_like(x, np.nan), y, num_classes=2)
    with pytest.raises(ValueError, match="rank"):
        ClassGaussian((2, 2, 1), 2, rank=5)


def _fitted_init(tiny_data, num_classes=3):
    x, y = tiny_data
    return ClassGaussian.fit(x, y, num_classes=num_classes)


def test_buffer_fill_and_restarts_come_from_the_class_gaussians(tiny_data):
    init = _fitted_init(tiny_data)
    # Per-class slots start from their own class: their means follow the classes' means.
    buffer = ReplayBuffer(image_shape=(8, 8, 1), size=3000, num_classes=3, seed=0, init=init, restart_prob=1.0)
    chains = buffer.chains().numpy()
    for k in range(3):
        np.testing.assert_allclose(chains[k * 1000:(k + 1) * 1000].mean(0).ravel(), init.means.numpy()[k],
                                   atol=0.1)
    # Every drawn chain restarts (probability 1): a draw is exactly the Gaussian of its label.
    labels = tf.constant([2] * 64, tf.int32)
    draw = buffer.draw(64, seed=[5, 6], labels=labels)
    assert bool(tf.reduce_all(draw.restarted))
    expected = init.sample(64, tf.random.experimental.stateless_fold_in(tf.constant([5, 6], tf.int64), 13),
                           labels=labels)
    np.testing.assert_array_equal(draw.x.numpy(), expected.numpy())
    # reset() refills from the Gaussians too, not from uniform noise.
    buffer.reset([1, 2])
    assert abs(buffer.chains().numpy()[:1000].mean() - init.means.numpy()[0].mean()) < 0.1
    with pytest.raises(ValueError, match="ClassGaussian"):
        ReplayBuffer(image_shape=(8, 8, 1), size=10, init="gaussian")


@pytest.mark.integration
def test_a_uniform_fraction_of_fresh_chains_starts_from_noise(tiny_data):
    init = _fitted_init(tiny_data)
    buffer = ReplayBuffer(image_shape=(8, 8, 1), size=4000, seed=0, init=init, restart_prob=1.0, uniform_fraction=0.25)
    gaussian = init.sample(4000, [0, 0]).numpy().reshape(4000, -1)
    # A Gaussian chain keeps its class's smooth brightness; a noise chain has i.i.d. uniform pixels (std 0.577).
    def is_noise(chains):
        return chains.reshape(len(chains), -1).std(axis=1) > 0.45

    assert not is_noise(gaussian).any()
    assert abs(is_noise(buffer.chains().numpy()).mean() - 0.25) < 0.03  # the initial fill
    draw = buffer.draw(4000, seed=[3, 4])  # every drawn chain restarts
    noise = is_noise(draw.x.numpy())
    assert abs(noise.mean() - 0.25) < 0.03
    assert abs(draw.x.numpy()[noise].mean()) < 0.02 and draw.x.numpy()[noise].min() >= -1.0
    np.testing.assert_array_equal(buffer.draw(4000, seed=[3, 4]).x.numpy(), draw.x.numpy())  # seeded
    # Saved with the buffer; 0 keeps the Gaussian draws bit for bit; bad values and a missing init refused.
    assert ReplayBuffer.from_config(buffer.get_config()).uniform_fraction == 0.25
    plain = ReplayBuffer(image_shape=(8, 8, 1), size=64, seed=0, init=init, restart_prob=1.0)
    np.testing.assert_array_equal(plain.draw(8, seed=[1, 1]).x.numpy(),
                                  ReplayBuffer(image_shape=(8, 8, 1), size=64, seed=0, init=init, restart_prob=1.0,
                                               uniform_fraction=0.0).draw(8, seed=[1, 1]).x.numpy())
    with pytest.raises(ValueError, match=r"uniform_fraction` must be in \[0, 1\]; received uniform_fraction=1.5"):
        ReplayBuffer(image_shape=(8, 8, 1), size=10, init=init, uniform_fraction=1.5)
    with pytest.raises(ValueError, match="needs an `init`"):
        ReplayBuffer(image_shape=(8, 8, 1), size=10, uniform_fraction=0.5)


def test_flat_fields_are_flat_low_frequency_images_in_range_and_seeded():
    fields = flat_fields([500, 8, 8, 3], [1, 2], value_range=(-1.0, 2.0)).numpy()
    assert fields.shape == (500, 8, 8, 3) and fields.min() >= -1.0 and fields.max() <= 2.0
    np.testing.assert_array_equal(fields, flat_fields([500, 8, 8, 3], [1, 2], value_range=(-1.0, 2.0)).numpy())
    # No detail: neighbouring pixels differ by at most a seventh of the range (a blend of four corner colours).
    assert np.abs(np.diff(fields, axis=1)).max() <= 3.0 / 7 + 1e-5
    assert np.abs(np.diff(fields, axis=2)).max() <= 3.0 / 7 + 1e-5
    spread = fields.std(axis=(1, 2))  # from one colour everywhere to a full blend
    assert spread.min() < 0.02 and spread.max() > 0.5


def test_a_flat_fraction_of_starts_are_flat_fields_and_the_uniform_rows_keep_their_seeds():
    x, y = separable_data(90)
    init = ClassGaussian.fit(x, y, num_classes=3, rank=4)
    kwargs = dict(image_shape=(8, 8, 1), value_range=(-1.0, 1.0), init=init)
    SEED = tf.constant([9, 0], tf.int64)
    uniform = start_chains(2000, SEED, uniform_fraction=0.2, **kwargs).numpy()
    mixed = start_chains(2000, SEED, uniform_fraction=0.2, flat_fraction=0.3, **kwargs).numpy()
    noise = uniform.reshape(2000, -1).std(axis=1) > 0.45
    np.testing.assert_array_equal(mixed[noise], uniform[noise])  # the uniform rows and their noise unchanged
    smooth = np.abs(np.diff(mixed, axis=1)).max(axis=(1, 2, 3)) <= 2.0 / 7 + 1e-5
    changed = np.any(mixed != uniform, axis=(1, 2, 3))
    assert abs(changed.mean() - 0.3) < 0.04 and smooth[changed].all()
    plain = start_chains(2000, SEED, image_shape=(8, 8, 1), value_range=(-1.0, 1.0), flat_fraction=0.5).numpy()
    assert abs((plain.reshape(2000, -1).std(axis=1) < 0.45).mean() - 0.5) < 0.04  # without init: noise + fields
    with pytest.raises(ValueError, match="must be at most 1; received 0.8 \\+ 0.3"):
        start_chains(4, SEED, uniform_fraction=0.8, flat_fraction=0.3, **kwargs)
    with pytest.raises(ValueError, match="needs images \\[H, W, C\\]"):
        start_chains(4, SEED, image_shape=(4,), value_range=(-1.0, 1.0), flat_fraction=0.3)
    buffer = ReplayBuffer(image_shape=(8, 8, 1), size=40, seed=0, init=init, uniform_fraction=0.2, flat_fraction=0.3)
    assert ReplayBuffer.from_config(buffer.get_config()).flat_fraction == 0.3
    np.testing.assert_array_equal(buffer.fresh_chains(40, SEED).numpy(),
                                  start_chains(40, SEED, uniform_fraction=0.2, flat_fraction=0.3, **kwargs).numpy())
    with pytest.raises(ValueError, match="flat_fraction` must be in \\[0, 1\\]; received flat_fraction=-1"):
        ReplayBuffer(image_shape=(8, 8, 1), size=10, flat_fraction=-1)
    with pytest.raises(ValueError, match="must be at most 1"):
        ReplayBuffer(image_shape=(8, 8, 1), size=10, init=init, uniform_fraction=0.8, flat_fraction=0.3)


@pytest.mark.integration
def test_jem_with_class_gaussians_saves_restores_bit_exactly_and_samples_from_them(tiny_data, tmp_path):
    x, y = tiny_data
    model = tiny_jem(chain_init=_fitted_init(tiny_data), buffer_size=96,
                     sampler=SGLDSampler(n_steps=2, noise_std=0.0, grad_clamp=1.0, clamp_range=(-1, 1)))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.chain_init, ClassGaussian)
    for a, b in zip(model.chain_init.weights, loaded.chain_init.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(model.replay_buffer.chains().numpy(), loaded.replay_buffer.chains().numpy())
    assert loaded.sampler.grad_clamp == 1.0
    # sample(n_steps=0) is the start distribution itself: the class Gaussians of the labels.
    labels = np.array([0, 1, 2, 2])
    start = loaded.sample(4, seed=3, n_steps=0, labels=labels)
    expected = model.chain_init.sample(4, tf.constant([3, 0], tf.int64), labels=tf.constant(labels, tf.int32))
    np.testing.assert_array_equal(start, expected.numpy())
    uniform = loaded.sample(4, seed=3, n_steps=0, init="uniform")
    assert not np.array_equal(start, uniform)
    # Training continues identically after the round trip.
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    plain = tiny_jem()
    with pytest.raises(ValueError, match="class_gaussian"):
        plain.sample(2, init="class_gaussian")


@pytest.mark.integration
def test_exported_sample_signature_starts_from_the_class_gaussians(tiny_data, tmp_path):
    x, y = tiny_data
    model = tiny_jem(chain_init=_fitted_init(tiny_data))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = export_saved_model(model, str(tmp_path / "export"), calibration_images=x, dataset="tiny")
    metadata = json.load(open(os.path.join(path, METADATA_FILE)))
    assert metadata["sample"]["start"].startswith("class Gaussians")
    request = {"num_samples": np.int32(6), "n_steps": np.int32(0), "seed": np.int64(11),
               "class_label": np.int32(1), "step_size": np.float32(0.0), "noise_std": np.float32(-1.0)}
    np.savez(tmp_path / "inputs.npz", images=x[:5], **request)
    # In a process without Keras or jem_tf, as TF Serving runs it.
    result = subprocess.run([sys.executable, HELPER, path, str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = dict(np.load(tmp_path / "out.npz"))
    # n_steps 0, class 1: exactly the model's class-1 Gaussian draw for the seed.
    seed = tf.constant([11, 0], tf.int64)
    expected = model.chain_init.sample(6, seed, labels=tf.fill([6], 1)).numpy()
    np.testing.assert_allclose(served["object/sample_conditional/samples"], expected, atol=1e-6)
    np.testing.assert_allclose(served["session/sample_conditional/samples"], expected, atol=1e-6)


@pytest.mark.integration
def test_class_gaussians_are_part_of_the_backup_weights(tiny_data, tmp_path):
    """The training backup (``save_weights``) holds the Gaussians: restoring it into a model whose
    Gaussians were fitted to other data brings back the run's own."""
    x, y = tiny_data
    model = tiny_jem(chain_init=_fitted_init(tiny_data))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / "state.weights.h5")
    model.save_weights(path)
    other = tiny_jem(chain_init=ClassGaussian.fit(-x, y, num_classes=3))
    assert not np.array_equal(other.chain_init.means.numpy(), model.chain_init.means.numpy())
    other.load_weights(path)
    for a, b in zip(model.chain_init.weights, other.chain_init.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(model.replay_buffer.chains().numpy(), other.replay_buffer.chains().numpy())


def test_uniform_start_is_seeded_and_fills_the_value_range():
    SEED = tf.constant([3, 0], tf.int64)
    x = start_chains(2000, SEED, image_shape=(2, 3), value_range=(-2.0, 4.0)).numpy()
    assert x.shape == (2000, 2, 3) and x.dtype == np.float32
    assert -2.0 <= x.min() < -1.9 and 3.9 < x.max() <= 4.0
    np.testing.assert_allclose(x.mean(), 1.0, atol=0.1)  # uniform on [-2, 4]: mean 1
    again = start_chains(2000, SEED, image_shape=(2, 3), value_range=(-2.0, 4.0), labels=tf.zeros([2000],
                                                                                                          tf.int32))
    np.testing.assert_array_equal(x, again.numpy())  # same seed, same images; labels do not matter
    other = start_chains(2000, tf.constant([4, 0], tf.int64), image_shape=(2, 3), value_range=(-2.0, 4.0))
    assert not np.array_equal(x, other.numpy())


def test_class_gaussian_start_of_given_labels_and_of_prior_drawn_ones():
    SEED = tf.constant([3, 0], tf.int64)
    images, labels = separable_data(90)
    init = ClassGaussian.fit(images, labels, num_classes=3, rank=4)
    kwargs = dict(image_shape=(8, 8, 1), value_range=(-1.0, 1.0), init=init)
    given = tf.constant([0, 1, 2, 2], tf.int32)
    np.testing.assert_array_equal(start_chains(4, SEED, labels=given, **kwargs).numpy(),
                                  init.sample(4, SEED, labels=given).numpy())
    # Label -1: the class ClassGaussian.sample's own draw (labels None) gives that row.
    mixed = tf.constant([-1, 1, -1, 2], tf.int32)
    drawn = tf.where(mixed >= 0, mixed, init.draw_labels(4, seeds.fold(SEED, seeds.INIT_CLASS)))
    np.testing.assert_array_equal(start_chains(4, SEED, labels=mixed, **kwargs).numpy(),
                                  init.sample(4, SEED, labels=drawn).numpy())
    np.testing.assert_array_equal(start_chains(4, SEED, **kwargs).numpy(), init.sample(4, SEED).numpy())
    # Class means differ by brightness: starts of class 0 are darker than those of class 2.
    dark = start_chains(50, SEED, labels=tf.zeros([50], tf.int32), **kwargs).numpy()
    bright = start_chains(50, SEED, labels=tf.fill([50], 2), **kwargs).numpy()
    assert dark.mean() < bright.mean() - 0.5


@pytest.mark.integration
def test_one_start_distribution_for_buffer_sample_and_serving(tmp_path):
    """The replay buffer's fresh chains, JEM.sample's default start and the served `sample` signature's are one
    function (start_chains, with the model's uniform and flat shares): the same seed gives the same images."""
    images, labels = separable_data(90)
    init = ClassGaussian.fit(images, labels, num_classes=3, rank=4)
    model = tiny_jem(chain_init=init, chain_init_uniform_fraction=0.5, chain_init_flat_fraction=0.25, buffer_size=60)
    seed = tf.constant([5, 0], tf.int64)
    starts = start_chains(40, seed, image_shape=(8, 8, 1), value_range=(-1.0, 1.0), init=init, uniform_fraction=0.5,
                          flat_fraction=0.25)
    np.testing.assert_array_equal(model.replay_buffer.fresh_chains(40, seed).numpy(), starts.numpy())
    np.testing.assert_array_equal(model.sample(40, seed=5, n_steps=0), starts.numpy())
    # About half of the starts are uniform noise (i.i.d. pixels: large jumps between neighbours), a quarter flat
    # fields (neighbours within 2/7), the rest class Gaussians.
    jumps = np.abs(np.diff(starts.numpy(), axis=2)).max(axis=(1, 2, 3))
    assert 0.25 < np.mean(jumps > 1.0) < 0.75 and 0.05 < np.mean(jumps <= 2.0 / 7 + 1e-5) < 0.45
    model.save(str(tmp_path / "m.keras"))
    assert keras.models.load_model(str(tmp_path / "m.keras")).replay_buffer.flat_fraction == 0.25
    served = tf.saved_model.load(export_saved_model(model, str(tmp_path / "jem"), ood_threshold=0.0,
                                                    max_num_samples=8, max_n_steps=20))
    request = dict(num_samples=tf.constant(8), seed=tf.constant(5, tf.int64), class_label=tf.constant(-1),
                   step_size=tf.constant(0.0), noise_std=tf.constant(-1.0))
    for steps in (0, 20):
        out = served.signatures["sample"](n_steps=tf.constant(steps), **request)["samples"].numpy()
        np.testing.assert_allclose(out, np.clip(model.sample(8, seed=5, n_steps=steps), -1, 1), atol=1e-5)
