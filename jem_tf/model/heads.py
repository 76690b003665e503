"""What a logits network's last layer is and what is built on it: the linear ``Dense`` head that a temperature
divides (:func:`with_temperature`), that a density head extends with an energy offset ``g(x)``
(:func:`with_density_head`) and that test-time views average (:mod:`jem_tf.model.views`)."""

from __future__ import annotations

from typing import Optional, Tuple

import keras
import numpy as np

from jem_tf.keras_workarounds import all_layers

LOGIT_ACTIVATIONS = ("linear", None)


def activation_name(layer) -> Optional[str]:
    """The name of a layer's ``activation`` (``"linear"``, ``"softmax"``, ...), or ``None`` when it has none."""
    activation = getattr(layer, "activation", None)
    return None if activation is None else getattr(activation, "__name__", str(activation))


def is_graph_network(model: keras.Model) -> bool:
    """Plain Functional and Sequential models (whose layer graph ``clone_model`` copies), not subclasses."""
    return type(model) is keras.Sequential or type(model).__name__ == "Functional"


def linear_head(network: keras.Model, what: str) -> keras.layers.Dense:
    """The last layer of a Functional or Sequential ``network`` when it is a linear ``Dense`` layer on ``[batch, D]``
    features (the head that :func:`with_density_head`, :func:`with_temperature` and test-time augmentation build on);
    ``ValueError`` saying that ``what`` needs one otherwise."""
    head = network.layers[-1] if is_graph_network(network) and network.layers else None
    if not isinstance(head, keras.layers.Dense) or activation_name(head) not in LOGIT_ACTIVATIONS \
            or len(head.input.shape) != 2:
        raise ValueError(f"{what} needs a network that ends in a linear Dense layer on [batch, features]; "
                         f"{network.name!r} ends in {getattr(head, 'name', None)!r} ({type(head).__name__})")
    return head


def head_input(network: keras.Model, head: keras.layers.Dense) -> Tuple[object, keras.KerasTensor]:
    """``(inputs, features)``: graph tensors of ``network``'s input and of the ``[batch, D]`` features its linear
    ``head`` (:func:`linear_head`) reads, to build a model on. A Functional network's own (its one image input); a
    Sequential one's layers but the head, called on a new input (its layers have no graph to extend)."""
    if not isinstance(network, keras.Sequential):
        return network.input, head.input
    inputs = features = keras.Input(shape=tuple(network.input_shape[1:]))
    for layer in network.layers[:-1]:
        features = layer(features)
    return inputs, features


def with_temperature(network: keras.Model, temperature: float, *, in_place: bool = False) -> keras.Model:
    """A copy of ``network`` whose logits are ``f(x) / temperature``: its linear ``Dense`` head's kernel and bias
    divided by ``temperature`` (:func:`linear_head`). The same predictions; ``p(y|x) = softmax(f / T)``, calibrated when
    ``T`` is fitted on held-out data (:func:`jem_tf.metrics.fit_temperature`, Guo et al., 2017), and the energy
    ``-logsumexp(f / T)``. ``network`` is unchanged, unless ``in_place`` (then its head is divided and it is returned:
    e.g. a trained JEM's ``backbone``).

    Raises:
        ValueError: ``temperature`` is not a finite number > 0, or ``network`` has no linear ``Dense`` head.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"with_temperature needs a finite temperature > 0; received temperature={temperature!r}")
    linear_head(network, "a temperature")
    if not in_place:
        network, source = keras.models.clone_model(network), network
        network.set_weights(source.get_weights())
    head = network.layers[-1]
    head.kernel.assign(head.kernel / float(temperature))
    if head.use_bias:
        head.bias.assign(head.bias / float(temperature))
    return network


@keras.saving.register_keras_serializable(package="jem_tf")
class LastRowOfOnes(keras.constraints.Constraint):
    """Keeps a kernel's last row at ones: the row that adds a density head's offset ``g(x)`` to every logit
    (:func:`with_density_head` with ``train_classifier=True``), whatever the optimizer and its weight decay do."""

    def __call__(self, kernel):
        return keras.ops.concatenate([kernel[:-1], keras.ops.ones_like(kernel[-1:])], axis=0)


def with_density_head(network: keras.Model, *, units: int, seed: Optional[int] = None,
                      train_classifier: bool = False) -> keras.Model:
    """``network`` with its classifier fixed and a trainable energy offset: logits ``f(x) + g(x)``, where ``f`` is
    ``network``'s logits and ``g(x)`` a scalar from a small MLP (``units`` GELU units, then one linear unit,
    initialised to 0) on its penultimate features, added to every logit.

    ``softmax(f + g) = softmax(f)``: ``p(y|x)``, hence accuracy and calibration, are exactly the classifier's, and
    the cross-entropy gives ``g`` no gradient; the JEM's ``p(x)`` term trains ``g`` alone (``log p(x) =
    logsumexp f(x) + g(x) + const``). A conversion that must keep everything its classifier had.

    Every layer of ``network`` is frozen (``trainable = False``; batch norm then runs in inference mode), in place.
    The last layer is rebuilt as a frozen ``Dense`` over ``[features, g]`` whose kernel is the head's with a row of
    ones for ``g``, so the model still ends in a linear head on (now ``D + 1``) penultimate features (what the OOD
    detector's ``mahalanobis`` and the Fréchet features read).

    ``train_classifier=True``: a fine-tune with a density head. ``network``'s layers keep their ``trainable`` flags
    and the last ``Dense`` trains too, its row of ones held by a :class:`LastRowOfOnes` constraint: the cross-entropy
    trains the classifier, the ``p(x)`` term trains both, and ``p(y|x)`` is no longer the classifier's as it was.

    Raises:
        ValueError: ``units`` is not a positive int, or ``network`` does not end in a linear ``Dense`` layer on
            ``[batch, D]`` features.
    """
    if not (isinstance(units, int) and not isinstance(units, bool) and units >= 1):
        raise ValueError(f"with_density_head needs units >= 1; received units={units!r}")
    head = linear_head(network, "a density head")
    if not train_classifier:
        for layer in all_layers(network):
            layer.trainable = False
    inputs, features = head_input(network, head)
    hidden = keras.layers.Dense(units, activation="gelu", kernel_initializer=keras.initializers.HeNormal(seed),
                                name="density_hidden")(features)
    offset = keras.layers.Dense(1, kernel_initializer="zeros", name="density_offset")(hidden)
    joined = keras.layers.Concatenate(name="density_features")([features, offset])
    num_classes = int(head.units)
    logits = keras.layers.Dense(num_classes, use_bias=head.use_bias, trainable=bool(train_classifier),
                                kernel_constraint=LastRowOfOnes() if train_classifier else None, name=head.name)
    logits.build(joined.shape)
    kernel = np.concatenate([head.kernel.numpy(), np.ones((1, num_classes), np.float32)])
    logits.set_weights([kernel] + ([head.bias.numpy()] if head.use_bias else []))
    return keras.Model(inputs, logits(joined), name=network.name)
