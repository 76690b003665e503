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
for users; :func:`jem_tf.model_files.load_classifier` reads a classifier from a file for the CLI's ``--init-from``.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from jem_tf import energy as energy_lib

# Activations of a last layer whose pre-activation values are the logits.
_SOFTMAX_ACTIVATIONS = ("softmax", "log_softmax")
_LOGIT_ACTIVATIONS = ("linear", None)


def _activation_name(layer) -> Optional[str]:
    activation = getattr(layer, "activation", None)
    return None if activation is None else getattr(activation, "__name__", str(activation))


def softmax_head(network: keras.Model) -> Optional[str]:
    """A description of the softmax ``network``'s last layer applies, or ``None`` when it ends in logits."""
    layers = getattr(network, "layers", None) or []
    if not layers:
        return None
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return f"layer {last.name!r} is a Softmax"
    name = _activation_name(last)
    if name in _SOFTMAX_ACTIVATIONS:
        return f"layer {last.name!r} has activation={name!r}"
    return None


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
    name = _activation_name(model.layers[-1]) if getattr(model, "layers", None) else None
    if name not in _LOGIT_ACTIVATIONS + _SOFTMAX_ACTIVATIONS:
        raise ValueError(f"{what} ends in activation={name!r} on layer {model.layers[-1].name!r}: a JEM needs logits "
                         "or a softmax head (whose logits are taken), not a bounded or rectified output")
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
    head = softmax_head(classifier)
    if not _is_graph_network(classifier):
        if head is not None:
            raise ValueError(f"the classifier ends in a softmax ({head}) and is a subclassed model whose head cannot "
                             "be edited: return logits from its call() (and use from_logits losses)")
        return classifier, [f"{classifier.name!r} is a subclassed model: the JEM trains this model object itself "
                            "(its weights are not copied)"]
    last = classifier.layers[-1]
    remove_last = head is not None and not last.weights  # Softmax / Activation layers

    def clone_layer(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "float32"  # a mixed-precision source: the JEM sets its own precision
        if layer is last and head is not None and not remove_last:
            config["activation"] = None  # the pre-activation output: the logits
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(classifier, clone_function=clone_layer)
    clone.set_weights(classifier.get_weights())
    if not remove_last:
        changes = [] if head is None else [f"took the logits of the last layer: {head}, now removed "
                                           "(activation=None, same weights)"]
        return clone, changes
    if isinstance(clone, keras.Sequential):
        network = keras.Sequential([keras.Input(shape=tuple(classifier.input_shape[1:]))] + clone.layers[:-1],
                                   name=clone.name)
    else:
        network = keras.Model(clone.inputs, clone.layers[-1].input, name=clone.name)
    return network, [f"took the logits that enter the last layer: {head}, now removed"]


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


def mean_energy(network: keras.Model, images: np.ndarray, *, max_images: int = 2048, batch_size: int = 256) -> float:
    """The mean energy ``-logsumexp_y f(x)[y]`` of a logits ``network`` (inference mode, float32) on the first
    ``max_images`` of ``images``: where a converted classifier's energies sit before fine-tuning, the centre of
    its energy L2 term (``energy_l2_center``; see :mod:`jem_tf.objective`).

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
