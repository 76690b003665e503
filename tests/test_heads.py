"""jem_tf.model.heads: a temperature and a density head on a logits network's linear head."""

import warnings

import keras
import numpy as np
import pytest
from conftest import functional_cnn, images_8x8, users_cnn

from jem_tf import JEM, SGLDSampler
from jem_tf.model.conversion import logits_network
from jem_tf.model.heads import LastRowOfOnes, with_density_head, with_temperature
from jem_tf.model.views import with_test_time_augmentation, without_test_time_augmentation
from jem_tf.networks import FLOAT32_LAYERS, with_precision

IMAGES = images_8x8()


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_a_density_head_keeps_the_classifiers_probabilities_exactly_and_trains_alone(kind):
    classifier = functional_cnn(head=None) if kind == "functional" else users_cnn()
    logits = classifier.predict(IMAGES, verbose=0)
    features = classifier.layers[-1].input.shape[-1]
    network = with_density_head(logits_network(classifier)[0], units=4, seed=0)
    np.testing.assert_array_equal(network.predict(IMAGES, verbose=0), logits)  # the offset starts at 0
    assert [layer.name for layer in network.layers if layer.trainable_weights] == ["density_hidden", "density_offset"]
    assert network.layers[-1].input.shape[-1] == features + 1  # a linear head on [features, g]
    rng = np.random.default_rng(0)
    network.get_layer("density_offset").set_weights([rng.normal(size=(4, 1)).astype("float32"), np.ones(1, "float32")])
    shifted = network.predict(IMAGES, verbose=0)
    offsets = shifted - logits  # the same g(x) added to every logit of a row
    np.testing.assert_allclose(offsets - offsets[:, :1], 0.0, atol=1e-5)
    assert np.ptp(offsets[:, 0]) > 1e-3
    np.testing.assert_allclose(keras.ops.softmax(shifted), keras.ops.softmax(logits), atol=1e-6)


@pytest.mark.integration  # trains and saves a JEM: about 3 s
def test_a_density_head_conversion_changes_only_the_energy_and_survives_saving(tmp_path):
    classifier = functional_cnn(head="softmax")
    probabilities = classifier.predict(IMAGES, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the softmax head is taken off, with a warning
        jem = JEM.from_classifier(classifier, density_head=8, buffer_size=16, sampler=SGLDSampler(n_steps=2),
                                  px_weight=1.0, seed=0)
    jem.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = jem.energy(IMAGES)
    jem.fit(IMAGES, np.arange(16) % 3, batch_size=8, epochs=2, verbose=0)
    np.testing.assert_allclose(keras.ops.softmax(jem.predict(IMAGES, verbose=0)), probabilities, atol=1e-5)
    assert np.abs(jem.energy(IMAGES) - before).max() > 1e-3  # the density moved
    path = str(tmp_path / "jem.keras")
    jem.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.energy(IMAGES), jem.energy(IMAGES), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("units, message", [(0, "units >= 1"), (True, "units >= 1")])
def test_a_density_head_refuses_bad_units_and_networks_without_a_linear_head(units, message):
    network = logits_network(functional_cnn(head=None))[0]
    with pytest.raises(ValueError, match=message):
        with_density_head(network, units=units)
    inputs = keras.Input((8, 8, 1))
    pooled = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 3)(inputs)))
    with pytest.raises(ValueError, match=r"ends in a linear Dense layer on \[batch, features\]; 'functional.*' ends"):
        with_density_head(pooled, units=2)


def conv_classifier():
    """A Functional 8x8x1 CNN with logits, fixed random weights: ``conv`` ([B, 8, 8, 4]) then ``pool``."""
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(conv)
    network = keras.Model(inputs, keras.layers.Dense(3, name="logits")(pooled))
    rng = np.random.default_rng(3)
    network.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in network.get_weights()])
    return network


def test_a_density_head_reads_an_earlier_layers_channel_means_and_deviations(tmp_path):
    classifier = conv_classifier()
    logits = classifier.predict(IMAGES, verbose=0)
    # Taken out of test-time views first: the tapped layer's first call then lies in another graph.
    single_view = without_test_time_augmentation(with_test_time_augmentation(classifier, "flip"))
    network = with_density_head(single_view, units=4, seed=0, layers=["conv"])
    np.testing.assert_array_equal(network.predict(IMAGES, verbose=0), logits)  # the offset starts at 0
    assert [layer.name for layer in network.layers if layer.trainable_weights] == ["density_hidden", "density_offset"]
    maps = keras.Model(classifier.input, classifier.get_layer("conv").output).predict(IMAGES, verbose=0)
    read = keras.Model(network.input, network.get_layer("density_inputs").output).predict(IMAGES, verbose=0)
    np.testing.assert_allclose(read[:, :4], maps.mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(read[:, 4:8], np.sqrt(maps.var(axis=(1, 2)) + 1e-6), atol=1e-5)
    np.testing.assert_allclose(read[:, 8:], maps.mean(axis=(1, 2)), atol=1e-5)  # the pooled features last
    hidden = network.get_layer("density_hidden")
    assert hidden.kernel.shape == (12, 4)
    rng = np.random.default_rng(0)
    network.get_layer("density_offset").set_weights([rng.normal(size=(4, 1)).astype("float32"), np.ones(1, "float32")])
    kernel = hidden.kernel.numpy()
    kernel[8:] = 0.0  # the offset now depends on the conv layer's statistics alone
    hidden.kernel.assign(kernel)
    shifted = network.predict(IMAGES, verbose=0)
    assert np.ptp((shifted - logits)[:, 0]) > 1e-3
    np.testing.assert_allclose(keras.ops.softmax(shifted), keras.ops.softmax(logits), atol=1e-6)
    wrapped = with_test_time_augmentation(network, "flip")  # what a CIFAR-10 conversion serves
    path = str(tmp_path / "head.keras")
    wrapped.save(path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(IMAGES, verbose=0),
                               wrapped.predict(IMAGES, verbose=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers, message", [
    (["pool2"], r"no layer of .* is named 'pool2'; its layers: conv, pool"),
    (["logits"], "is named 'logits'"), ("conv", "a list of distinct layer names"),
    (["conv", "conv"], "a list of distinct layer names")])
def test_a_density_head_refuses_layers_it_cannot_read(layers, message):
    with pytest.raises(ValueError, match=message):
        with_density_head(conv_classifier(), units=2, layers=layers)
    with pytest.raises(ValueError, match="`layers` needs a Functional network; received a Sequential one"):
        with_density_head(users_cnn(), units=2, layers=["conv"])


def test_a_nonpositive_offset_can_only_lower_log_px_and_survives_saving(tmp_path):
    classifier = conv_classifier()
    logits = classifier.predict(IMAGES, verbose=0)
    network = with_density_head(classifier, units=4, seed=0, layers=["conv"], offset="nonpositive")
    np.testing.assert_allclose(network.predict(IMAGES, verbose=0) - logits, -np.log(2.0), atol=1e-6)  # -softplus(0)
    offset = network.get_layer("density_offset")
    kernel = np.random.default_rng(1).normal(0, 5, (4, 1)).astype("float32")
    for bias, low, high in ((-20.0, -1e-3, 0.0), (0.0, -np.inf, 0.0), (20.0, -np.inf, -10.0)):
        offset.set_weights([kernel, np.full(1, bias, "float32")])  # pre-activations far below, around, far above 0
        g = (network.predict(IMAGES, verbose=0) - logits)[:, 0]
        assert np.all((g >= low) & (g <= high)), (bias, g)
        assert bias < 0 or np.ptp(g) > 1e-3
    np.testing.assert_allclose(keras.ops.softmax(network.predict(IMAGES, verbose=0)), keras.ops.softmax(logits),
                               atol=1e-6)
    path = str(tmp_path / "head.keras")
    network.save(path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(IMAGES, verbose=0),
                               network.predict(IMAGES, verbose=0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"offset in \('free', 'nonpositive'\); received offset='negative'"):
        with_density_head(classifier, units=4, offset="negative")


@pytest.mark.parametrize("kwargs, message", [
    ({"density_head_layers": ["conv"]}, r"density_head_layers \['conv'\] needs a density head"),
    ({"density_head_offset": "nonpositive"}, "density_head_offset 'nonpositive' needs a density head"),
    ({"density_temperature": 2.0}, "density_temperature 2.0 needs a density head")])
def test_from_classifier_refuses_density_head_settings_without_a_density_head(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JEM.from_classifier(conv_classifier(), **kwargs)


def test_from_classifier_builds_the_offset_it_is_given():
    jem = JEM.from_classifier(conv_classifier(), density_head=4, density_head_offset="nonpositive", buffer_size=8,
                              seed=0, density_temperature=2.0)
    assert jem.backbone.get_layer("density_offset_nonpositive") is not None
    assert jem.backbone.get_layer("density_temperature_offset").temperature == 2.0


def _logsumexp(z):
    return np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)


@pytest.mark.parametrize("kind", ["sequential", "layers", "mixed_bfloat16"])
def test_a_density_temperature_holds_on_every_way_a_head_is_built(kind):
    """A Sequential classifier, a head that reads an earlier layer, and a 16-bit copy (whose temperature layers stay
    float32, so the identity holds to the 16-bit rounding of ``g`` alone)."""
    classifier = users_cnn() if kind == "sequential" else conv_classifier()
    raw = classifier.predict(IMAGES, verbose=0).astype(np.float64)
    network = with_density_head(classifier, units=4, seed=0, temperature=0.5,
                                layers=["conv"] if kind == "layers" else ())
    network.get_layer("density_offset").set_weights([np.random.default_rng(2).normal(0, 1, (4, 1)).astype("float32"),
                                                     np.full(1, 0.3, "float32")])
    tolerance = 1e-4
    if kind == "mixed_bfloat16":
        network, tolerance = with_precision(network, "mixed_bfloat16"), 0.05
        assert all(network.get_layer(name).dtype_policy.name == "float32" for name in FLOAT32_LAYERS)
    g = keras.Model(network.input, network.get_layer("density_offset").output).predict(IMAGES, verbose=0)[:, 0]
    logits = network.predict(IMAGES, verbose=0).astype(np.float64)
    np.testing.assert_allclose(_logsumexp(logits), _logsumexp(raw / 0.5) + g.astype(np.float64), atol=tolerance)
    assert np.abs(_logsumexp(raw / 0.5) - _logsumexp(raw)).max() > 0.1


@pytest.mark.parametrize("calibration, density", [(1.0, 0.5), (2.0, 1.0), (0.7, 3.0)])
def test_a_density_temperature_sets_log_px_alone_and_survives_saving(tmp_path, calibration, density):
    """A classifier calibrated by ``with_temperature(T)`` under a head of ``temperature=tau / T``: ``softmax`` is the
    calibrated ``p(y|x)`` and ``log p(x) = logsumexp(f / tau) + g`` of the classifier's own logits ``f``."""
    classifier = conv_classifier()
    raw = classifier.predict(IMAGES, verbose=0).astype(np.float64)
    network = with_density_head(with_temperature(classifier, calibration), units=4, seed=0,
                                temperature=density / calibration)
    network.get_layer("density_offset").set_weights([np.random.default_rng(2).normal(0, 1, (4, 1)).astype("float32"),
                                                     np.full(1, 0.3, "float32")])
    g = keras.Model(network.input, network.get_layer("density_offset").output).predict(IMAGES, verbose=0)[:, 0]
    assert np.ptp(g) > 1e-3
    logits = network.predict(IMAGES, verbose=0).astype(np.float64)
    np.testing.assert_allclose(keras.ops.softmax(logits), keras.ops.softmax(raw / calibration), atol=1e-5)
    np.testing.assert_allclose(_logsumexp(logits), _logsumexp(raw / density) + g, rtol=1e-5, atol=1e-4)
    assert np.abs(_logsumexp(raw / calibration) - _logsumexp(raw / density)).max() > 1e-2  # calibration alone differs
    path = str(tmp_path / "head.keras")
    network.save(path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(IMAGES, verbose=0), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "with_density_head needs a finite temperature > 0; received temperature=0.0"),
    ({"temperature": float("nan")}, "received temperature=nan"),
    ({"temperature": 2.0, "train_classifier": True}, "temperature=2.0 needs train_classifier=False")])
def test_a_density_head_refuses_a_temperature_it_cannot_use(kwargs, message):
    with pytest.raises(ValueError, match=message):
        with_density_head(conv_classifier(), units=2, **kwargs)


def test_a_temperature_divides_the_logits_of_a_copy():
    network = logits_network(functional_cnn(head=None))[0]
    head = network.layers[-1]
    head.bias.assign(np.linspace(-1, 1, head.bias.shape[0]).astype("float32"))
    scaled = with_temperature(network, 2.5)
    np.testing.assert_allclose(scaled(IMAGES).numpy(), network(IMAGES).numpy() / 2.5, rtol=1e-5, atol=1e-6)
    assert scaled is not network and not {id(v) for v in scaled.weights} & {id(v) for v in network.weights}
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="finite temperature > 0; received temperature="):
            with_temperature(network, bad)
    inputs = keras.Input((8, 8, 1))
    pooled = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 3)(inputs)))
    with pytest.raises(ValueError, match="a temperature needs a network that ends in a linear Dense layer"):
        with_temperature(pooled, 2.0)


def test_a_density_head_over_a_trained_classifier_keeps_its_row_of_ones(tmp_path):
    """`train_classifier=True`: the classifier and its head train with the density head; the row that adds g(x) to
    every logit stays ones through the optimizer's updates and weight decay, and saving."""
    from jem_tf.model.jem import JEM as JEMClass

    network = with_density_head(logits_network(functional_cnn(head=None))[0], units=4, seed=0, train_classifier=True)
    head = network.layers[-1]
    assert head.trainable and len([layer for layer in network.layers if layer.trainable_weights]) > 3
    jem = JEMClass(network, buffer_size=16, sampler=SGLDSampler(n_steps=2), px_weight=1.0, seed=0)
    jem.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.5))
    kernel_before = head.kernel.numpy().copy()
    jem.fit(IMAGES, np.arange(16) % 3, batch_size=8, epochs=2, verbose=0)
    kernel = head.kernel.numpy()
    np.testing.assert_array_equal(kernel[-1], np.ones_like(kernel[-1]))
    assert np.abs(kernel[:-1] - kernel_before[:-1]).max() > 1e-3  # the classifier's own head trained
    path = str(tmp_path / "jem.keras")
    jem.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.energy(IMAGES), jem.energy(IMAGES), rtol=1e-5, atol=1e-5)
    assert isinstance(loaded.backbone.layers[-1].kernel_constraint, LastRowOfOnes)
