"""From a trained classifier to the logits network a JEM trains: what a classifier's head is, and how a
softmax head gives back its logits.

A JEM needs the logits ``f(x)``: its energy ``E(x) = -logsumexp_y f(x)[y]`` is meaningless on
probabilities (``logsumexp`` of a softmax output is the same for every input). Keras classifiers usually end
in a softmax, so :func:`logits_network` takes the pre-softmax output of the last layer instead of refusing
the model:

* a last ``Softmax`` layer, or an ``Activation("softmax")`` layer, is removed (the layer before it gives the
  logits);
* a last layer with ``activation="softmax"`` (e.g. ``Dense(10, activation="softmax")``) is rebuilt with
  ``activation=None`` and the same weights;
* ``log_softmax`` heads are treated the same way (log-probabilities are logits up to a per-row constant, so
  ``p(y|x)`` is unchanged, but their ``logsumexp`` is 0 for every input);
* any other bounded or rectifying activation on the last layer (sigmoid, relu, ...) is refused: those
  outputs are not a softmax classifier's logits.

The network returned is a copy (weights copied exactly, nothing shared with the original model), so
fine-tuning the JEM never changes the user's classifier. :meth:`jem_tf.JEM.from_classifier` is the one call
for users; :func:`jem_tf.run.model_files.load_classifier` reads a classifier from a file for the CLI's ``--init-from``.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from jem_tf.keras_workarounds import all_layers
from jem_tf.model import energy as energy_lib

# Activations of a last layer whose pre-activation values are the logits.
_SOFTMAX_ACTIVATIONS = ("softmax", "log_softmax")
_LOGIT_ACTIVATIONS = ("linear", None)
# keras.ops called on a Functional model's tensors: softmax heads, and outputs that are not logits.
_SOFTMAX_OPS = ("Softmax", "LogSoftmax")
_BOUNDED_OPS = ("Relu", "Relu6", "Sigmoid", "Tanh", "Softplus", "Softsign", "Elu", "Selu", "Gelu", "Silu",
                "HardSigmoid", "HardSilu", "LeakyRelu", "Exp", "Absolute", "Square", "Sqrt")
# Layers that pass their input's values through unchanged at inference (a head may sit before them).
_PASS_THROUGH = tuple(getattr(keras.layers, name) for name in (
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "GaussianNoise",
    "AlphaDropout", "Identity", "Reshape", "Flatten", "ActivityRegularization") if hasattr(keras.layers, name))
_RECTIFIER_LAYERS = tuple(getattr(keras.layers, name) for name in ("ReLU", "ELU", "LeakyReLU", "PReLU")
                          if hasattr(keras.layers, name))


class Head(NamedTuple):
    """What produces a classifier's output: ``kind`` ``"logits"``, ``"softmax"`` (the logits enter it) or
    ``"bounded"`` (a rectified or bounded output: not logits); ``op`` the layer or operation (``None`` for an
    empty model), ``trailing`` the pass-through layers after it, ``where`` a description for messages and
    ``node`` its node index in a Functional graph."""

    kind: str
    op: object
    trailing: tuple
    where: str
    node: int = 0


def _activation_name(layer) -> Optional[str]:
    activation = getattr(layer, "activation", None)
    return None if activation is None else getattr(activation, "__name__", str(activation))


def _passes_values_through(op) -> bool:
    if isinstance(op, _PASS_THROUGH):
        return True
    if isinstance(op, keras.layers.Rescaling):
        return bool(np.all(np.asarray(op.scale) == 1) and np.all(np.asarray(op.offset) == 0))
    return isinstance(op, keras.layers.Activation) and _activation_name(op) in _LOGIT_ACTIVATIONS


def _judge(op, node: int, trailing: tuple) -> Head:
    """The :class:`Head` ``op`` makes (a nested model is judged by its own head)."""
    name = getattr(op, "name", type(op).__name__)
    if isinstance(op, keras.Model):
        inner = find_head(op)
        if inner.kind != "logits":
            return Head(inner.kind, op, trailing, f"{inner.where}, inside the nested model {name!r}", node)
        return Head("logits", op, trailing, f"model {name!r}", node)
    if isinstance(op, keras.layers.Softmax):
        return Head("softmax", op, trailing, f"layer {name!r} is a Softmax", node)
    if not isinstance(op, keras.layers.Layer):  # a keras.ops call
        kind = type(op).__name__
        if kind in _SOFTMAX_OPS:
            return Head("softmax", op, trailing, f"keras.ops.{name} on the output", node)
        if kind in _BOUNDED_OPS:
            return Head("bounded", op, trailing, f"keras.ops.{name} on the output", node)
        return Head("logits", op, trailing, f"operation {name!r}", node)
    if isinstance(op, _RECTIFIER_LAYERS):
        return Head("bounded", op, trailing, f"layer {name!r} is a {type(op).__name__}", node)
    activation = _activation_name(op)
    if activation in _SOFTMAX_ACTIVATIONS:
        return Head("softmax", op, trailing, f"layer {name!r} has activation={activation!r}", node)
    if activation not in _LOGIT_ACTIVATIONS:
        return Head("bounded", op, trailing, f"layer {name!r} has activation={activation!r}", node)
    return Head("logits", op, trailing, f"layer {name!r}", node)


def _walk_back(model: keras.Model):
    """``(op, node index)`` from a Functional or Sequential model's output backwards, while each op has one input."""
    if isinstance(model, keras.Sequential):
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        yield from ((layer, 0) for layer in reversed(layers))
        return
    history = model.outputs[0]._keras_history
    op, node = history.operation, history.node_index
    while not isinstance(op, keras.layers.InputLayer):
        yield op, node
        inputs = op._inbound_nodes[node].input_tensors
        if len(inputs) != 1:
            return
        op, node = inputs[0]._keras_history.operation, inputs[0]._keras_history.node_index


def find_head(model: keras.Model) -> Head:
    """The layer or operation that makes ``model``'s output, found by walking back from the output through
    layers that pass values through unchanged at inference (dropout and noise layers, ``Reshape``, ``Flatten``,
    ``Identity``, an identity ``Rescaling``, a linear ``Activation``); nested models are looked into. A softmax
    followed by a ``Rescaling`` that changes values is ``"bounded"`` (scaled probabilities are not logits);
    rescaled logits (a temperature) end at that ``Rescaling``. A subclassed model is judged by its last layer
    (its call order is not known)."""
    if not (_is_graph_network(model) and getattr(model, "outputs", None)):
        layers = getattr(model, "layers", None) or []
        return _judge(layers[-1], 0, ()) if layers else Head("logits", None, (), "no layers")
    passed = []  # (op, node) walked through, nearest the output first
    head = None
    for op, node in _walk_back(model):
        if _passes_values_through(op) or isinstance(op, keras.layers.Rescaling):
            passed.append((op, node))
            continue
        head = _judge(op, node, tuple(o for o, _ in reversed(passed)))
        break
    if head is None:  # nothing but pass-through layers (or none)
        if not passed:
            return Head("logits", None, (), "no layers")
        (op, node), passed = passed[-1], passed[:-1]
        head = _judge(op, node, tuple(o for o, _ in reversed(passed)))
    scaled = [i for i, (op, _) in enumerate(passed)
              if isinstance(op, keras.layers.Rescaling) and not _passes_values_through(op)]
    if not scaled:
        return head
    if head.kind == "softmax":
        return head._replace(kind="bounded", where=f"{head.where}, followed by {passed[scaled[0]][0].name!r}, a "
                                                   "Rescaling that changes its values (scaled probabilities)")
    op, node = passed[scaled[0]]  # rescaled logits: the outermost rescaling makes the output
    return Head("logits", op, tuple(o for o, _ in reversed(passed[:scaled[0]])), f"layer {op.name!r}", node)


def softmax_head(network: keras.Model) -> Optional[str]:
    """A description of the softmax ``network``'s output comes from (:func:`find_head`), or ``None`` when it
    does not end in one."""
    head = find_head(network)
    return head.where if head.kind == "softmax" else None


def check_logits(network: keras.Model, images: np.ndarray, *, max_images: int = 256) -> None:
    """``ValueError`` when a logits ``network``'s outputs on ``images`` (inference mode) are probabilities
    (every row non-negative and summing to 1) or log-probabilities (every row's ``logsumexp`` 0, so every
    energy would be 0), whatever its layers say: a softmax hidden in custom code."""
    outputs = np.asarray(tf.cast(network(np.asarray(images)[:max_images], training=False), tf.float64))
    if not np.all(np.isfinite(outputs)):
        raise ValueError("its outputs on the training images are not finite")
    if np.all(outputs >= 0) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("its outputs on the training images are probabilities (every row non-negative and summing "
                         "to 1), not logits: return the values that enter the softmax")
    if np.allclose(energy_lib.log_px(tf.constant(outputs)).numpy(), 0.0, atol=1e-3):
        raise ValueError("its outputs on the training images are log-probabilities (logsumexp 0 on every image, so "
                         "every energy would be 0), not logits: return the values that enter the log-softmax")


def _is_graph_network(model: keras.Model) -> bool:
    """Plain Functional and Sequential models (whose layer graph ``clone_model`` copies), not subclasses."""
    return type(model) is keras.Sequential or type(model).__name__ == "Functional"


def check_classifier(model, *, image_shape: Optional[Sequence[int]] = None,
                     num_classes: Optional[int] = None, what: str = "the classifier") -> Tuple[tuple, int]:
    """``(image_shape, num_classes)`` of a Keras classifier; ``ValueError`` naming the problem when ``model``
    is not one (not a Keras model, several inputs or outputs, an output that is not ``[batch, classes]``,
    a dynamic image shape) or does not fit ``image_shape``/``num_classes`` (when given)."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"{what} must be a keras.Model; received {type(model).__name__}")
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if inputs is not None and len(inputs) != 1:
        raise ValueError(f"{what} is not an image classifier: it has {len(inputs)} inputs (expected one image input)")
    if outputs is not None and len(outputs) != 1:
        raise ValueError(f"{what} is not a classifier: it has {len(outputs)} outputs (expected one [batch, classes] "
                         "output)")
    if isinstance(getattr(model, "output", None), dict) or isinstance(getattr(model, "_outputs_struct", None), dict):
        raise ValueError(f"{what} is not a classifier: its output is a dict (expected one [batch, classes] tensor)")
    if inputs:
        dtype = keras.backend.standardize_dtype(inputs[0].dtype)
        if not dtype.startswith(("float", "bfloat")):
            raise ValueError(f"{what} takes {dtype} images: a JEM samples images by gradient steps and needs a "
                             "float input (rescale inside the model, e.g. keras.layers.Rescaling, after a float "
                             "Input)")
    try:
        input_shape, output_shape = model.input_shape, model.output_shape
    except (AttributeError, ValueError) as error:
        if image_shape is None:  # a subclassed model: its shapes are known only by calling it
            raise ValueError(f"{what} has no static input shape (build it with a fixed input shape, e.g. "
                             "keras.Input(shape=(28, 28, 1)), or pass image_shape)") from error
        input_shape = (None, *image_shape)
        output_shape = (None, *model(keras.ops.zeros((1, *image_shape))).shape[1:])
    output_shape = tuple(output_shape)
    if len(output_shape) != 2 or output_shape[-1] is None or output_shape[-1] < 2:
        raise ValueError(f"{what} is not a classifier: its output has shape {output_shape} (expected "
                         "(batch, num_classes) with num_classes >= 2)")
    found_shape = tuple(input_shape[1:])
    if len(found_shape) != 3 or any(d is None for d in found_shape):
        raise ValueError(f"{what} is not an image classifier with a static input shape: its input has shape "
                         f"{tuple(input_shape)} (expected (batch, height, width, channels) with fixed sizes)")
    if image_shape is not None and tuple(image_shape) != found_shape:
        raise ValueError(f"{what} takes images of shape {found_shape}, but the data's images have shape "
                         f"{tuple(image_shape)}")
    if num_classes is not None and output_shape[-1] != num_classes:
        raise ValueError(f"{what} has {output_shape[-1]} classes, but the data has {num_classes}")
    head = find_head(model)
    if head.kind == "bounded":
        raise ValueError(f"{what}'s output comes from {head.where}: a JEM needs logits or a softmax head (whose "
                         "logits are taken), not a bounded or rectified output")
    return found_shape, int(output_shape[-1])


def logits_network(classifier: keras.Model, *, image_shape: Optional[Sequence[int]] = None,
                   num_classes: Optional[int] = None) -> Tuple[keras.Model, List[str]]:
    """A float32 copy of ``classifier`` that outputs its logits, and what was changed (a list of sentences; empty when
    the classifier already ends in logits).

    Weights are copied exactly; the copy shares nothing with ``classifier``. Functional and Sequential models
    are cloned; a subclassed model that ends in logits is used as it is (it cannot be cloned without its
    code, so the JEM trains that model object itself: the list says so); a subclassed model with a softmax
    head is refused (its head cannot be edited).

    Raises:
        ValueError: ``classifier`` is not a classifier of ``image_shape`` images and ``num_classes`` classes
            (see :func:`check_classifier`).
    """
    check_classifier(classifier, image_shape=image_shape, num_classes=num_classes)
    head = find_head(classifier)
    if not _is_graph_network(classifier):
        if head.kind == "softmax":
            raise ValueError(f"the classifier ends in a softmax ({head.where}) and is a subclassed model whose head "
                             "cannot be edited: return logits from its call() (and use from_logits losses)")
        return classifier, [f"{classifier.name!r} is a subclassed model: the JEM trains this model object itself "
                            "(its weights are not copied)"]
    if head.kind == "softmax" and isinstance(head.op, keras.Model):
        raise ValueError(f"the classifier's softmax is {head.where}, which cannot be edited: make the nested model "
                         "return logits, or build the classifier without nesting")
    # The head's own activation is dropped in the copy (same weights): its output is then the logits. A weightless
    # softmax (a Softmax or Activation layer, a keras.ops call) is left out instead: its input is the logits.
    edit_activation = head.kind == "softmax" and isinstance(head.op, keras.layers.Layer) and bool(head.op.weights)
    keep_head = head.kind != "softmax" or edit_activation

    def clone_layer(layer):
        if not isinstance(layer, keras.layers.Layer):  # a keras.ops call (e.g. a residual `x + h`)
            return layer.__class__.from_config(layer.get_config())
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "float32"  # a mixed-precision source: the JEM sets its own precision
        if edit_activation and layer is head.op:
            config["activation"] = None  # the pre-activation output: the logits
        return layer.__class__.from_config(config)

    try:
        clone = keras.models.clone_model(classifier, clone_function=clone_layer)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the classifier could not be copied ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}); save it as a Functional or Sequential model of Keras "
                         "layers") from error
    clone.set_weights(classifier.get_weights())
    if head.kind == "logits" and not head.trailing:
        return clone, []
    cloned_head = find_head(clone)
    dropped = [f"{getattr(op, 'name', op)!r}" for op in head.trailing]
    if isinstance(clone, keras.Sequential):
        layers = [layer for layer in clone.layers if not isinstance(layer, keras.layers.InputLayer)]
        keep = layers.index(cloned_head.op) + int(keep_head)
        network = keras.Sequential([keras.Input(shape=tuple(classifier.input_shape[1:]))] + layers[:keep],
                                   name=clone.name)
    else:
        node = cloned_head.op._inbound_nodes[cloned_head.node]
        network = keras.Model(clone.inputs, node.output_tensors[0] if keep_head else node.input_tensors[0],
                              name=clone.name)
    changes = []
    if head.kind == "softmax":
        changes.append(f"took the logits of the softmax head: {head.where}, now removed" +
                       (" (activation=None, same weights)" if edit_activation else ""))
    if dropped:
        changes.append(f"removed the layers after the head, which pass values through at inference: "
                       f"{', '.join(dropped)}")
    return network, changes


def backbone_from_classifier(classifier: keras.Model, *, image_shape: Optional[Sequence[int]] = None,
                             num_classes: Optional[int] = None) -> keras.Model:
    """The backbone :meth:`jem_tf.JEM.from_classifier` trains: :func:`logits_network` of ``classifier``, with a
    ``UserWarning`` that says what was changed (none when nothing was).

    The JEM trains a copy (weights copied exactly; the user's model is never changed). Nothing else carries
    over: the optimizer state is the new ``compile``'s, and the replay buffer starts from the JEM's
    ``chain_init`` (or uniform noise).
    """
    backbone, changes = logits_network(classifier, image_shape=image_shape, num_classes=num_classes)
    if changes:
        # stacklevel: the warning points at the caller of JEM.from_classifier.
        warnings.warn(f"JEM.from_classifier: {'; '.join(changes)}.", UserWarning, stacklevel=3)
    return backbone


def linear_head(network: keras.Model, what: str) -> keras.layers.Dense:
    """The last layer of a Functional or Sequential ``network`` when it is a linear ``Dense`` layer on ``[batch, D]``
    features (the head that :func:`with_density_head`, :func:`with_temperature` and test-time augmentation build on);
    ``ValueError`` saying that ``what`` needs one otherwise."""
    head = network.layers[-1] if _is_graph_network(network) and network.layers else None
    if not isinstance(head, keras.layers.Dense) or _activation_name(head) not in _LOGIT_ACTIVATIONS \
            or len(head.input.shape) != 2:
        raise ValueError(f"{what} needs a network that ends in a linear Dense layer on [batch, features]; "
                         f"{network.name!r} ends in {getattr(head, 'name', None)!r} ({type(head).__name__})")
    return head


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
    if isinstance(network, keras.Sequential):  # its layers, called on a new input: a Functional graph to extend
        inputs = features = keras.Input(shape=tuple(network.input_shape[1:]))
        for layer in network.layers[:-1]:
            features = layer(features)
    else:
        inputs, features = network.inputs, head.input
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


def mean_energy(network: keras.Model, images: np.ndarray, *, max_images: int = 2048, batch_size: int = 256) -> float:
    """The mean energy ``-logsumexp_y f(x)[y]`` of a logits ``network`` (inference mode, float32) on the first
    ``max_images`` of ``images``: where a converted classifier's energies sit before fine-tuning, the centre of
    its energy L2 term (``energy_l2_center``; see :mod:`jem_tf.model.objective`).

    Example:
        >>> center = mean_energy(backbone_from_classifier(my_cnn), x_train)
        >>> jem = JEM.from_classifier(my_cnn, energy_l2_weight=0.01, energy_l2_center=center)
    """
    if not (isinstance(max_images, int) and max_images >= 1):
        raise ValueError(f"`max_images` must be an int >= 1; received {max_images!r}")
    images = np.asarray(images)[:max_images]
    if len(images) == 0:
        raise ValueError("mean_energy needs at least one image; received an empty array")
    total = 0.0
    for start in range(0, len(images), batch_size):
        logits = tf.cast(network(images[start:start + batch_size], training=False), tf.float32)
        total += float(tf.reduce_sum(energy_lib.energy(logits)))
    value = total / len(images)
    if not np.isfinite(value):
        raise ValueError(f"the classifier's mean energy on the training images is {value}: its logits are not finite")
    return value


def file_sha256(path: str, *, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file's contents, as hex (recorded for a converted run's source)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
