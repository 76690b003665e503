"""What a logits network's last layer is and what is built on it: the linear ``Dense`` head that a temperature
divides (:func:`with_temperature`), that a density head extends with an energy offset ``g(x)``
(:func:`with_density_head`) and that test-time views average (:mod:`jem_tf.model.views`)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from jem_tf.choices import DENSITY_HEAD_OFFSETS
from jem_tf.keras_workarounds import all_layers
from jem_tf.networks import FLOAT32_LAYERS

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
    _check_temperature(temperature, "with_temperature")
    linear_head(network, "a temperature")
    if not in_place:
        network, source = keras.models.clone_model(network), network
        network.set_weights(source.get_weights())
    head = network.layers[-1]
    head.kernel.assign(head.kernel / float(temperature))
    if head.use_bias:
        head.bias.assign(head.bias / float(temperature))
    return network


def _check_temperature(temperature, what: str) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{what} needs a finite temperature > 0; received temperature={temperature!r}")


@keras.saving.register_keras_serializable(package="jem_tf")
class LastRowOfOnes(keras.constraints.Constraint):
    """Keeps a kernel's last row at ones: the row that adds a density head's offset ``g(x)`` to every logit
    (:func:`with_density_head` with ``train_classifier=True``), whatever the optimizer and its weight decay do."""

    def __call__(self, kernel):
        return keras.ops.concatenate([kernel[:-1], keras.ops.ones_like(kernel[-1:])], axis=0)


@keras.saving.register_keras_serializable(package="jem_tf")
class NonPositive(keras.layers.Layer):
    """``z -> -softplus(z) = -log(1 + e^z)``: a density head's offset bounded above by 0 (:func:`with_density_head`
    with ``offset="nonpositive"``), smooth, with gradient ``-sigmoid(z)`` everywhere."""

    def call(self, z):
        return -keras.ops.softplus(z)


@keras.saving.register_keras_serializable(package="jem_tf")
class TemperatureOffset(keras.layers.Layer):
    """Logits ``z`` -> ``[B, 1]``: ``logsumexp(z / temperature) - logsumexp(z)``, in float32. Added to a density
    head's offset (:func:`with_density_head` with ``temperature``) it makes the density that of ``z / temperature``:
    ``logsumexp(z + g + this) = logsumexp(z / temperature) + g``, while ``softmax(z)``, ``p(y|x)``, is unchanged.
    No weights; ``temperature`` is saved in the config."""

    def __init__(self, temperature: float, **kwargs):
        super().__init__(**kwargs)
        _check_temperature(temperature, "TemperatureOffset")
        self.temperature = float(temperature)

    def call(self, logits):
        logits = tf.cast(logits, tf.float32)
        return (tf.reduce_logsumexp(logits / self.temperature, axis=-1, keepdims=True)
                - tf.reduce_logsumexp(logits, axis=-1, keepdims=True))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1)

    def compute_output_spec(self, logits):
        return keras.KerasTensor((logits.shape[0], 1), "float32")

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="jem_tf")
class FeatureStatistics(keras.layers.Layer):
    """``[B, H, W, C]`` feature maps -> ``[B, 2C]``: each channel's mean and standard deviation over the positions,
    in float32 (what a density head reads from an early layer, :func:`with_density_head`'s ``layers``: how much of
    each low-level pattern an image holds, and how unevenly); ``[B, D]`` features pass through as float32."""

    def call(self, features):
        features = tf.cast(features, tf.float32)
        if len(features.shape) == 2:
            return features
        axes = list(range(1, len(features.shape) - 1))
        mean, variance = tf.nn.moments(features, axes=axes)
        return tf.concat([mean, tf.sqrt(variance + 1e-6)], axis=-1)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        return (input_shape[0], channels if len(input_shape) == 2 else 2 * channels)

    def compute_output_spec(self, features):
        return keras.KerasTensor(self.compute_output_shape(features.shape), "float32")


def tapped_graph(network: keras.Model, head: keras.layers.Dense, names: Sequence[str]
                 ) -> Tuple[object, keras.KerasTensor, list]:
    """``(inputs, features, taps)``: :func:`head_input`'s graph tensors of a Functional ``network`` together with the
    outputs of its layers named in ``names`` (each ``[B, H, W, C]`` or ``[B, D]``), all in one graph: ``network``'s
    graph traced again through its own layers (shared, not copied), since a layer's ``output`` is that of its first
    call, which for a network taken out of another (:mod:`jem_tf.model.views`) lies in a graph of its own.

    Raises:
        ValueError: an entry of ``names`` is not such a layer of ``network`` (the message lists those there are).
    """
    layers = {layer.name: layer for layer in network.layers[1:-1]}
    usable = [name for name, layer in layers.items() if len(layer.output.shape) in (2, 4)]
    for name in names:
        if name not in usable:
            raise ValueError(f"no layer of {network.name!r} with [batch, H, W, C] or [batch, D] outputs is named "
                             f"{name!r}; its layers: {', '.join(usable)}")
    outputs = {}

    def call(layer, *args, **kwargs):
        result = layer(*args, **kwargs)
        if layer is head:
            outputs[head.name] = args[0]
        elif layer.name in names:
            outputs[layer.name] = result
        return result

    traced = keras.models.clone_model(network, clone_function=lambda layer: layer, call_function=call)
    return traced.input, outputs[head.name], [outputs[name] for name in names]


def with_density_head(network: keras.Model, *, units: int, seed: Optional[int] = None,
                      train_classifier: bool = False, layers: Sequence[str] = (), offset: str = "free",
                      temperature: float = 1.0) -> keras.Model:
    """``network`` with its classifier fixed and a trainable energy offset: logits ``f(x) + g(x)``, where ``f`` is
    ``network``'s logits and ``g(x)`` a scalar from a small MLP (``units`` GELU units, then one linear unit,
    initialised to 0) on its penultimate features, added to every logit. ``layers``: names of earlier layers whose
    outputs the MLP reads as well, as per-channel means and standard deviations (:class:`FeatureStatistics`; e.g.
    ``["stem_act"]``): low-level statistics that penultimate features, pooled for classification, may not keep
    (flat or pixel-shuffled images). Needs a Functional network (a Sequential one's layers are called anew).
    ``offset``: ``"free"`` (any real ``g``), or ``"nonpositive"``: ``g = -softplus(.) <= 0`` (:class:`NonPositive`,
    ``-log 2`` everywhere at the start), so that the head can only make an input *less* likely than the classifier's
    ``logsumexp f`` (``logsumexp(f / tau)`` with ``temperature``) has it: inputs unlike anything the chains visited
    (flat images, say) keep at most the classifier's own score instead of whatever the MLP extrapolates to.
    ``temperature``: the density's own temperature
    ``tau``, ``log p(x) = logsumexp(f / tau) + g(x)`` (:class:`TemperatureOffset` joins ``g``), while ``p(y|x) =
    softmax(f)`` (e.g. ``1 / T`` keeps the density of a classifier whose logits :func:`with_temperature` divided by
    ``T`` for calibration); 1 (default): no extra layers. Its layers stay float32 under a 16-bit
    precision (:data:`jem_tf.networks.FLOAT32_LAYERS`). A test-time-augmented model (:mod:`jem_tf.model.views`)
    averages the logits of its views, so its log p(x) is ``logsumexp`` of the averaged logits plus the averaged
    ``g(x) + logsumexp(z / tau) - logsumexp(z)``, close to but not exactly ``logsumexp(mean z / tau) + mean g``.

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
        ValueError: ``units`` is not a positive int, ``offset`` is neither ``"free"`` nor ``"nonpositive"``,
            ``temperature`` is not a finite number > 0 or comes with ``train_classifier`` (the classifier's logits
            must be fixed for the density's temperature to be its own),
            ``network`` does not end in a linear ``Dense`` layer on ``[batch, D]`` features, or ``layers`` names a
            layer it does not have (or ``network`` is Sequential).
    """
    if not (isinstance(units, int) and not isinstance(units, bool) and units >= 1):
        raise ValueError(f"with_density_head needs units >= 1; received units={units!r}")
    if offset not in DENSITY_HEAD_OFFSETS:
        raise ValueError(f"with_density_head needs offset in {DENSITY_HEAD_OFFSETS}; received offset={offset!r}")
    _check_temperature(temperature, "with_density_head")
    if temperature != 1:
        if train_classifier:
            raise ValueError(f"with_density_head's temperature={temperature!r} needs train_classifier=False (a "
                             "frozen classifier)")
    head = linear_head(network, "a density head")
    if isinstance(layers, str) or len(set(layers)) != len(layers):
        raise ValueError(f"with_density_head needs `layers` as a list of distinct layer names; received {layers!r}")
    if layers and isinstance(network, keras.Sequential):
        raise ValueError("with_density_head's `layers` needs a Functional network; received a Sequential one "
                         f"({network.name!r})")
    if layers:
        inputs, features, taps = tapped_graph(network, head, layers)
        statistics = [FeatureStatistics(name=f"density_statistics_{name}")(tap) for name, tap in zip(layers, taps)]
        read = keras.layers.Concatenate(name="density_inputs")(statistics + [features])
    else:
        inputs, features = head_input(network, head)
        read = features
    if not train_classifier:
        for layer in all_layers(network):
            layer.trainable = False
    hidden = keras.layers.Dense(units, activation="gelu", kernel_initializer=keras.initializers.HeNormal(seed),
                                name="density_hidden")(read)
    g = keras.layers.Dense(1, kernel_initializer="zeros", name="density_offset")(hidden)
    if offset == "nonpositive":
        g = NonPositive(name="density_offset_nonpositive")(g)
    if temperature != 1:  # float32 layers (FLOAT32_LAYERS): the head's logits, their correction, g + it
        logits_name, correction_name, offset_name = FLOAT32_LAYERS
        classifier_logits = keras.layers.Dense(head.units, use_bias=head.use_bias, trainable=False, name=logits_name)
        classifier_logits.build(features.shape)
        classifier_logits.set_weights(head.get_weights())
        correction = TemperatureOffset(temperature, name=correction_name)(classifier_logits(features))
        g = keras.layers.Add(name=offset_name)([g, correction])
    joined = keras.layers.Concatenate(name="density_features")([features, g])
    num_classes = int(head.units)
    logits = keras.layers.Dense(num_classes, use_bias=head.use_bias, trainable=bool(train_classifier),
                                kernel_constraint=LastRowOfOnes() if train_classifier else None, name=head.name)
    logits.build(joined.shape)
    kernel = np.concatenate([head.kernel.numpy(), np.ones((1, num_classes), np.float32)])
    logits.set_weights([kernel] + ([head.bias.numpy()] if head.use_bias else []))
    return keras.Model(inputs, logits(joined), name=network.name)
