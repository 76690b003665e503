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

import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from jem_tf.model import energy as energy_lib
from jem_tf.model.heads import LOGIT_ACTIVATIONS, activation_name, is_graph_network, with_density_head

# Activations of a last layer whose pre-activation values are the logits.
_SOFTMAX_ACTIVATIONS = ("softmax", "log_softmax")
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


def _passes_values_through(op) -> bool:
    if isinstance(op, _PASS_THROUGH):
        return True
    if isinstance(op, keras.layers.Rescaling):
        return bool(np.all(np.asarray(op.scale) == 1) and np.all(np.asarray(op.offset) == 0))
    return isinstance(op, keras.layers.Activation) and activation_name(op) in LOGIT_ACTIVATIONS


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
    activation = activation_name(op)
    if activation in _SOFTMAX_ACTIVATIONS:
        return Head("softmax", op, trailing, f"layer {name!r} has activation={activation!r}", node)
    if activation not in LOGIT_ACTIVATIONS:
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
    if not (is_graph_network(model) and getattr(model, "outputs", None)):
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
    if not is_graph_network(classifier):
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
                             num_classes: Optional[int] = None, density_head: int = 0,
                             density_head_layers: Sequence[str] = (), density_head_offset: str = "free",
                             density_temperature: float = 1.0, seed: Optional[int] = None) -> keras.Model:
    """The backbone :meth:`jem_tf.JEM.from_classifier` trains: :func:`logits_network` of ``classifier``, with a
    ``UserWarning`` that says what was changed (none when nothing was); with ``density_head`` > 0, that network
    frozen under a density head of that many units reading ``density_head_layers`` too, its offset
    ``density_head_offset`` and log p(x) at ``density_temperature`` (:func:`jem_tf.model.heads.with_density_head`'s
    ``temperature``, initialised with ``seed``).

    The JEM trains a copy (weights copied exactly; the user's model is never changed). Nothing else carries
    over: the optimizer state is the new ``compile``'s, and the replay buffer starts from the JEM's
    ``chain_init`` (or uniform noise).

    Raises:
        ValueError: ``density_head_layers``, a ``density_head_offset`` other than ``"free"`` or a
            ``density_temperature`` other than 1 without a density
            head, or what :func:`logits_network` and
            :func:`~jem_tf.model.heads.with_density_head` refuse.
    """
    if density_head_layers and not density_head:
        raise ValueError(f"density_head_layers {list(density_head_layers)!r} needs a density head "
                         "(density_head > 0)")
    if density_head_offset != "free" and not density_head:
        raise ValueError(f"density_head_offset {density_head_offset!r} needs a density head (density_head > 0)")
    if density_temperature != 1 and not density_head:
        raise ValueError(f"density_temperature {density_temperature!r} needs a density head (density_head > 0)")
    backbone, changes = logits_network(classifier, image_shape=image_shape, num_classes=num_classes)
    if changes:
        # stacklevel: the warning points at the caller of JEM.from_classifier.
        warnings.warn(f"JEM.from_classifier: {'; '.join(changes)}.", UserWarning, stacklevel=3)
    if density_head:
        backbone = with_density_head(backbone, units=density_head, seed=seed, layers=density_head_layers,
                                     offset=density_head_offset, temperature=density_temperature)
    return backbone


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
