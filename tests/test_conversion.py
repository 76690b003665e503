"""jem_tf.model.conversion: a classifier's logits, copied exactly; what is not a classifier of the data, refused."""

import warnings

import keras
import numpy as np
import pytest
from conftest import _segmenter, functional_cnn, images_8x8, users_cnn

from jem_tf import JEM, SGLDSampler
from jem_tf.model.conversion import check_classifier, check_logits, logits_network, mean_energy, softmax_head

IMAGES = images_8x8()


def test_mean_energy_is_the_mean_negative_logsumexp_in_inference_mode():
    network, _ = logits_network(users_cnn())
    logits = network.predict(IMAGES, verbose=0).astype(np.float64)
    expected = float(np.mean(-np.log(np.exp(logits).sum(axis=1))))
    assert mean_energy(network, IMAGES, batch_size=5) == pytest.approx(expected, rel=1e-5)
    assert mean_energy(network, IMAGES, max_images=4) == pytest.approx(
        float(np.mean(-np.log(np.exp(logits[:4]).sum(axis=1)))), rel=1e-5)
    with pytest.raises(ValueError, match="max_images"):
        mean_energy(network, IMAGES, max_images=0)
    with pytest.raises(ValueError, match="empty"):
        mean_energy(network, IMAGES[:0])


@pytest.mark.integration
def test_weights_are_copied_exactly_and_nothing_is_shared():
    classifier = users_cnn()
    before = [w.copy() for w in classifier.get_weights()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a logits classifier needs no change: no warning
        jem = JEM.from_classifier(classifier, buffer_size=16, sampler=SGLDSampler(n_steps=1))
    for a, b in zip(jem.backbone.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jem.predict(IMAGES, verbose=0), classifier.predict(IMAGES, verbose=0))
    jem.compile(optimizer=keras.optimizers.Adam(1e-2))
    jem.fit(IMAGES, np.arange(16) % 3, batch_size=8, epochs=1, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(jem.backbone.get_weights(), before))
    for a, b in zip(classifier.get_weights(), before):  # the user's classifier is untouched
        np.testing.assert_array_equal(a, b)


@pytest.mark.integration
@pytest.mark.parametrize("head", ["softmax", "layer", "activation", "log_softmax", "functional"])
def test_a_softmax_head_gives_logits_equal_to_log_probabilities_up_to_a_row_constant(head):
    classifier = functional_cnn() if head == "functional" else users_cnn(head)
    with pytest.warns(UserWarning, match="took the logits"):
        jem = JEM.from_classifier(classifier, buffer_size=16)
    assert softmax_head(jem.backbone) is None
    logits = jem.predict(IMAGES, verbose=0).astype("float64")
    outputs = classifier.predict(IMAGES, verbose=0).astype("float64")
    log_probs = outputs if head == "log_softmax" else np.log(outputs)
    offset = logits - log_probs
    np.testing.assert_allclose(offset, offset[:, :1] * np.ones_like(offset), atol=1e-4)  # a constant per row
    np.testing.assert_array_equal(logits.argmax(1), outputs.argmax(1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs / probs.sum(1, keepdims=True), np.exp(log_probs), atol=1e-5)
    # log p(x) is no longer the same for every input (it was 0 on log-probabilities).
    assert np.std(jem.log_px(IMAGES)) > 1e-3
    assert len(jem.backbone.layers) == len(classifier.layers) - (head in ("layer", "activation"))


def _hostile_head(kind):
    """Classifiers whose output is not plainly a last layer's logits (each seen passing as logits before)."""
    inputs = keras.Input((8, 8, 1), dtype="uint8" if kind == "uint8_input" else "float32")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs) if kind == "uint8_input" else inputs)
    h = keras.layers.Dense(6, activation="relu")(x)
    if kind == "residual_logits":
        return keras.Model(inputs, keras.layers.Dense(3)(h + keras.layers.Dense(6)(h)))
    if kind == "ops_softmax":
        return keras.Model(inputs, keras.ops.softmax(keras.layers.Dense(3)(h + keras.layers.Dense(6)(h))))
    if kind == "nested_softmax":
        nested = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
        return keras.Model(inputs, nested(h))
    if kind == "dict_output":
        return keras.Model(inputs, {"class": keras.layers.Dense(3)(h)})
    tails = {"softmax_dropout": [keras.layers.Dense(3, activation="softmax"), keras.layers.Dropout(0.2)],
             "softmax_rescaling": [keras.layers.Dense(3, activation="softmax"), keras.layers.Rescaling(1.0)],
             "softmax_reshape": [keras.layers.Dense(3, activation="softmax"), keras.layers.Reshape((3,))],
             "softmax_layer_dropout": [keras.layers.Dense(3), keras.layers.Softmax(), keras.layers.Dropout(0.1)],
             "relu_layer": [keras.layers.Dense(3), keras.layers.ReLU()],
             "scaled_softmax": [keras.layers.Dense(3, activation="softmax"), keras.layers.Rescaling(2.0)],
             "uint8_input": [keras.layers.Dense(3)]}[kind]
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(6, activation="relu"),
                             *tails]) if kind != "uint8_input" else keras.Model(inputs, tails[0](h))


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["softmax_dropout", "softmax_rescaling", "softmax_reshape", "softmax_layer_dropout",
                                  "ops_softmax", "residual_logits"])
def test_heads_behind_pass_through_layers_and_raw_ops_give_their_logits(kind):
    classifier = _hostile_head(kind)
    network, changes = logits_network(classifier)
    assert softmax_head(network) is None
    logits = network.predict(IMAGES, verbose=0).astype("float64")
    outputs = classifier.predict(IMAGES, verbose=0).astype("float64")
    if kind == "residual_logits":
        assert changes == []
        np.testing.assert_allclose(logits, outputs, rtol=1e-5)
        return
    assert any("softmax" in change for change in changes), changes
    offset = logits - np.log(outputs)
    np.testing.assert_allclose(offset, offset[:, :1] * np.ones_like(offset), atol=1e-4)  # logits up to a row constant
    assert np.std(-np.log(np.exp(logits).sum(1))) > 1e-3  # energies that vary: not probabilities
    for a, b in zip(network.get_weights(), classifier.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_softmax_inside_a_nested_model_is_found_and_refused():
    with pytest.raises(ValueError, match="inside the nested model"):
        logits_network(_hostile_head("nested_softmax"))
    with pytest.raises(ValueError, match="ends in a softmax"):
        JEM(_hostile_head("softmax_dropout"), buffer_size=16)


def test_outputs_that_are_probabilities_are_refused_whatever_the_layers_say():
    hidden = SubclassedLogits(softmax=True)
    hidden(IMAGES[:1])
    with pytest.raises(ValueError, match="are probabilities"):
        check_logits(hidden, IMAGES)
    log_probs = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3),
                                  keras.layers.Lambda(lambda z: keras.ops.log_softmax(z))])
    with pytest.raises(ValueError, match="are log-probabilities"):
        check_logits(log_probs, IMAGES)
    check_logits(logits_network(users_cnn("softmax"))[0], IMAGES)  # logits pass


def test_a_mixed_precision_classifier_becomes_float32_with_the_same_weights():
    classifier = users_cnn()
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = keras.models.clone_model(classifier)
    finally:
        keras.config.set_dtype_policy(policy)
    mixed.set_weights(classifier.get_weights())
    network, _ = logits_network(mixed)
    assert {layer.dtype_policy.name for layer in network.layers} == {"float32"}
    for a, b in zip(network.get_weights(), classifier.get_weights()):
        np.testing.assert_array_equal(a, b)


class SubclassedLogits(keras.Model):
    def __init__(self, softmax=False):
        super().__init__()
        self.dense = keras.layers.Dense(3, activation="softmax" if softmax else None)

    def call(self, x):
        return self.dense(keras.ops.reshape(x, (-1, 64)))


def test_subclassed_classifiers_are_used_as_they_are_or_refused_with_a_softmax():
    model = SubclassedLogits()
    with pytest.warns(UserWarning, match="trains this model object itself"):
        jem = JEM.from_classifier(model, image_shape=(8, 8, 1), num_classes=3, buffer_size=16)
    assert jem.backbone is model
    with pytest.raises(ValueError, match="subclassed model whose head cannot be edited"):
        JEM.from_classifier(SubclassedLogits(softmax=True), image_shape=(8, 8, 1), num_classes=3)
    with pytest.raises(ValueError, match="no static input shape"):
        JEM.from_classifier(SubclassedLogits())


def _two_outputs():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, [keras.layers.Dense(3)(x), keras.layers.Dense(2)(x)])


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda: users_cnn(), {"image_shape": (28, 28, 1)},
     r"takes images of shape \(8, 8, 1\), but the data's images have shape \(28, 28, 1\)"),
    (lambda: users_cnn(), {"num_classes": 10}, "has 3 classes, but the data has 10"),
    (lambda: users_cnn(num_classes=1), {}, r"is not a classifier: its output has shape \(None, 1\)"),
    (_segmenter, {}, r"is not a classifier: its output has shape \(None, 8, 8, 3\)"),
    (_two_outputs, {}, "is not a classifier: it has 2 outputs"),
    (lambda: functional_cnn("sigmoid"), {}, "has activation='sigmoid'"),
    (lambda: _hostile_head("relu_layer"), {}, "is a ReLU: a JEM needs logits"),
    (lambda: _hostile_head("scaled_softmax"), {}, "a Rescaling that changes its values"),
    (lambda: _hostile_head("dict_output"), {}, "its output is a dict"),
    (lambda: _hostile_head("uint8_input"), {}, "takes uint8 images"),
    (lambda: users_cnn(input_shape=(None, None, 1)), {}, "not an image classifier with a static input shape"),
    (lambda: "model.keras", {}, "must be a keras.Model; received str"),
])
def test_what_is_not_a_classifier_of_the_data_is_refused(make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_classifier(make(), **kwargs)
    with pytest.raises(ValueError, match=message):
        JEM.from_classifier(make(), buffer_size=16, **kwargs)
