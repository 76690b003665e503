"""jem_tf.model.views: test-time augmentation as part of the network, and a run that ends with it."""

import json
import os

import keras
import numpy as np
import pytest
from conftest import CLASSIFIER, tiny_jem

from jem_tf import train
from jem_tf.keras_workarounds import all_layers
from jem_tf.model import energy as energy_lib
from jem_tf.model.views import (
    jem_with_views,
    view_weights,
    views_of,
    with_test_time_augmentation,
    without_test_time_augmentation,
)
from jem_tf.networks import small_cnn, with_precision
from jem_tf.run.model_files import load_classifier, source_classifier_network
from jem_tf.run.workdir import load_run_config


def _images(n=5, shape=(8, 8, 3), seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n,) + shape).astype("float32")


def _views_by_hand(network, x, mode):
    """The views' logits averaged with numpy: mirror = reversed columns, shifts = reflect-padded crops."""
    def f(images):
        return network(images, training=False).numpy().astype(np.float64)

    flip = lambda images: images[:, :, ::-1]  # noqa: E731
    plain = 0.5 * f(x) + 0.5 * f(flip(x))
    if mode == "flip":
        return plain
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    up_left, down_right = padded[:, :-2, :-2], padded[:, 2:, 2:]
    return (0.5 * plain + 0.125 * (f(up_left) + f(flip(up_left)) + f(down_right) + f(flip(down_right))))


@pytest.mark.parametrize("mode", ["flip", "flip_shift"])
def test_the_wrapped_network_averages_the_views_logits(mode):
    network = small_cnn(num_classes=4, input_shape=(8, 8, 3), width=4, stages=1, seed=0)
    # Non-trivial logits: random head weights (the initial head is close to zero).
    head = network.layers[-1]
    head.kernel.assign(np.random.default_rng(1).normal(size=head.kernel.shape).astype("float32"))
    x = _images()
    wrapped = with_test_time_augmentation(network, mode)
    np.testing.assert_allclose(wrapped(x).numpy(), _views_by_hand(network, x, mode), rtol=1e-5, atol=1e-5)
    assert views_of(wrapped) == mode and views_of(network) == "none"
    assert abs(sum(view_weights(mode)) - 1.0) < 1e-12
    # The same weights (shared, not copied), and the last layer is still the linear head.
    assert {id(v) for v in wrapped.weights} == {id(v) for v in network.weights}
    assert wrapped.layers[-1] is head
    # A mirror-symmetric image's flip view is itself: "flip" leaves its logits unchanged.
    symmetric = np.concatenate([x[:, :, :4], x[:, :, :4][:, :, ::-1]], axis=2)
    if mode == "flip":
        np.testing.assert_allclose(wrapped(symmetric).numpy(), network(symmetric).numpy(), rtol=1e-5, atol=1e-5)
    # Taking the single-view network back out gives the same function, and "none" changes nothing.
    single = without_test_time_augmentation(wrapped)
    np.testing.assert_array_equal(single(x).numpy(), network(x).numpy())
    assert views_of(single) == "none"
    assert without_test_time_augmentation(network) is network
    assert with_test_time_augmentation(network, "none") is network


def test_a_sequential_network_is_wrapped_too():
    network = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(3, 3), keras.layers.Flatten(),
                                keras.layers.Dense(2)])
    x = _images(shape=(8, 8, 1))
    wrapped = with_test_time_augmentation(network, "flip")
    np.testing.assert_allclose(wrapped(x).numpy(), _views_by_hand(network, x, "flip"), rtol=1e-5, atol=1e-5)


def test_bad_wrapping_is_a_value_error_naming_the_value():
    network = small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1)
    with pytest.raises(ValueError, match="'rotate'"):
        with_test_time_augmentation(network, "rotate")
    with pytest.raises(ValueError, match="already averages over the 'flip' views"):
        with_test_time_augmentation(with_test_time_augmentation(network, "flip"), "flip_shift")
    softmax = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3),
                                keras.layers.Softmax(name="probabilities")])
    with pytest.raises(ValueError, match="ends in 'probabilities'"):
        with_test_time_augmentation(softmax, "flip")


def test_a_jem_with_views_keeps_its_state_and_saves(tmp_path):
    model = tiny_jem()
    x = _images(8, (8, 8, 1))
    model.replay_buffer.chains()  # the buffer as filled at construction
    wrapped = jem_with_views(model, "flip_shift")
    assert jem_with_views(model, "none") is model
    np.testing.assert_allclose(wrapped.logits(x).numpy(), _views_by_hand(model.backbone, x, "flip_shift"),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(wrapped.replay_buffer.chains().numpy(), model.replay_buffer.chains().numpy())
    assert wrapped.get_config()["buffer_size"] == model.buffer_size and wrapped.sampler.n_steps == model.sampler.n_steps
    # Its energy is the averaged logits' logsumexp: one function of x (SGLD and the export use it as it is).
    np.testing.assert_allclose(wrapped.energy(x), energy_lib.energy(wrapped.logits(x)).numpy(), rtol=1e-5)
    wrapped.compile(optimizer=keras.optimizers.Adam(1e-3))
    wrapped.optimizer.build(wrapped.trainable_variables)
    path = str(tmp_path / "wrapped.keras")
    wrapped.save(path)
    loaded = keras.saving.load_model(path)
    assert views_of(loaded.backbone) == "flip_shift"
    np.testing.assert_allclose(loaded.logits(x).numpy(), wrapped.logits(x).numpy(), rtol=1e-6, atol=1e-6)
    samples = loaded.sample(4, seed=0, n_steps=2)
    assert samples.shape == (4, 8, 8, 1)


def test_precision_reaches_the_single_view_network_inside():
    wrapped = with_test_time_augmentation(small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1), "flip")
    half = with_precision(wrapped, "mixed_bfloat16")
    policies = {layer.name: layer.dtype_policy.name for layer in all_layers(half)}
    assert policies["stem_conv"] == "mixed_bfloat16" and policies["logits"] == "float32"
    assert views_of(half) == "flip"
    back = with_precision(half, "float32")
    np.testing.assert_array_equal(back(_images(3, (8, 8, 1))).numpy(), wrapped(_images(3, (8, 8, 1))).numpy())


@pytest.mark.integration
def test_a_run_ends_with_its_views_and_a_conversion_fine_tunes_the_single_view(tmp_path):
    """`--test-time-augmentation flip`: the saved model, its test metrics and the export are the view-averaged
    network's; `--init-from` that run trains the single view and records that it took it out."""
    workdir = str(tmp_path / "classifier")
    assert train.main(CLASSIFIER + ["--epochs", "1", "--workdir", workdir, "--test-time-augmentation", "flip",
                                    "--export-dir", str(tmp_path / "export")]) == 0
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert "test_time_augmentation" in metrics["end_of_training_seconds"]
    model = keras.saving.load_model(os.path.join(workdir, "model.keras"))
    assert views_of(model.backbone) == "flip"
    from jem_tf.run.splits import load_run_dataset, run_splits

    config = load_run_config(workdir)
    splits = run_splits(config, load_run_dataset(config=config))
    logits = model.predict(splits.test.images, batch_size=256, verbose=0)
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == splits.test.labels)), abs=1e-6)
    exported = os.listdir(tmp_path / "export")
    assert len(exported) == 1

    source = load_classifier(workdir, image_shape=(8, 8, 1), num_classes=10)
    assert source.test_time_augmentation == "flip" and views_of(source.network) == "none"
    assert "took the single-view network out of its 'flip' test-time augmentation" in source.changes[0]
    as_it_was = source_classifier_network(config.replace(init_from=workdir), image_shape=(8, 8, 1), num_classes=10)
    np.testing.assert_allclose(as_it_was(splits.test.images[:16]).numpy(), logits[:16], rtol=1e-4, atol=1e-4)
    converted = str(tmp_path / "converted")
    assert train.main(CLASSIFIER + ["--epochs", "1", "--workdir", converted, "--init-from", workdir,
                                    "--px-weight", "1", "--sgld-steps", "2"]) == 0
    assert views_of(keras.saving.load_model(os.path.join(converted, "model.keras")).backbone) == "none"
