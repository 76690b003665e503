"""Test-time augmentation as part of the network: logits averaged over mirrored and shifted views of each image.

:func:`with_test_time_augmentation` wraps a trained logits network ``f`` into ``f_tta(x) = sum_v w_v f(view_v(x))``
(averaged in the penultimate features, which is the same through a linear head). The wrapped network *is* the model
from then on: ``p(y|x) = softmax(f_tta(x))``, ``E(x) = -logsumexp f_tta(x)``, the OOD detector's features, the
export's ``classify``, ``energy`` and ``sample`` signatures. The energy is a proper energy of ``x`` (the average of
the views' logits is one more differentiable function of ``x``); sampling through it costs one forward pass per
view.

Training runs on the single-view network (the JEM's SGLD chains would pay once per view); the training pipeline
wraps the network after ``fit`` (config ``test_time_augmentation``), and a conversion (``--init-from``) takes the
single-view network back out (:func:`without_test_time_augmentation`) to fine-tune it.

Views (``TEST_TIME_AUGMENTATIONS``; those of fast CIFAR-10 training, e.g. airbench):

* ``"flip"``: the image and its left-right mirror image, 1/2 each;
* ``"flip_shift"``: those two at 1/4 each, plus both shifted one pixel up-left and one pixel down-right (reflect
  padding), 1/8 each.

The views are stacked along the batch: one pass of the single-view network over ``views x batch`` images.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import keras
import tensorflow as tf

from jem_tf.choices import TEST_TIME_AUGMENTATIONS
from jem_tf.model.heads import head_input, linear_head

# (flip, (dy, dx), weight) per view.
_VIEWS = {
    "flip": ((False, (0, 0), 0.5), (True, (0, 0), 0.5)),
    "flip_shift": ((False, (0, 0), 0.25), (True, (0, 0), 0.25), (False, (-1, -1), 0.125), (True, (-1, -1), 0.125),
                   (False, (1, 1), 0.125), (True, (1, 1), 0.125)),
}
_FEATURES_SUFFIX = "_single_view_features"


def _views(mode: str) -> tuple:
    """``mode``'s ``(flip, (dy, dx), weight)`` views; ``ValueError`` naming an unknown mode."""
    if mode not in _VIEWS:
        raise ValueError(f"`mode` must be one of {tuple(_VIEWS)}; received {mode!r}")
    return _VIEWS[mode]


class _ViewsLayer(keras.layers.Layer):
    """A layer of one test-time augmentation ``mode`` (its views and weights in ``_VIEWS``)."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        _views(mode)
        self.mode = mode

    @property
    def num_views(self) -> int:
        return len(_VIEWS[self.mode])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="jem_tf")
class ImageViews(_ViewsLayer):
    """``[B, H, W, C]`` images -> ``[V * B, H, W, C]``: the ``mode``'s views stacked along the batch (view-major)."""

    def call(self, images):
        height, width = images.shape[1], images.shape[2]
        padded = None
        views = []
        for flip, (dy, dx), _ in _VIEWS[self.mode]:
            view = images
            if dy or dx:
                if padded is None:
                    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
                view = padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width, :]
            views.append(tf.reverse(view, axis=[2]) if flip else view)
        return tf.concat(views, axis=0)

    def compute_output_shape(self, input_shape):
        batch = None if input_shape[0] is None else input_shape[0] * self.num_views
        return (batch,) + tuple(input_shape[1:])


@keras.saving.register_keras_serializable(package="jem_tf")
class ViewAverage(_ViewsLayer):
    """``[V * B, ...]`` (view-major, as :class:`ImageViews` stacks them) -> ``[B, ...]``: the views' weighted mean."""

    def call(self, stacked):
        weights = [weight for _, _, weight in _VIEWS[self.mode]]
        per_view = tf.split(stacked, len(weights), axis=0)
        return tf.add_n([tf.cast(weight, stacked.dtype) * view for weight, view in zip(weights, per_view)])

    def compute_output_shape(self, input_shape):
        batch = None if input_shape[0] is None else input_shape[0] // self.num_views
        return (batch,) + tuple(input_shape[1:])


def _parts(network: keras.Model) -> Optional[Tuple[ImageViews, keras.Model, keras.layers.Dense]]:
    """``(views layer, single-view features model, head)`` of a wrapped network, ``None`` for any other."""
    layers = list(getattr(network, "layers", None) or [])
    views = [layer for layer in layers if isinstance(layer, ImageViews)]
    features = [layer for layer in layers if isinstance(layer, keras.Model) and layer.name.endswith(_FEATURES_SUFFIX)]
    if len(views) != 1 or len(features) != 1 or not isinstance(layers[-1], keras.layers.Dense):
        return None
    return views[0], features[0], layers[-1]


def views_of(network: keras.Model) -> str:
    """The views ``network`` averages over (:func:`with_test_time_augmentation`), or ``"none"``."""
    parts = _parts(network)
    return "none" if parts is None else parts[0].mode


def with_test_time_augmentation(network: keras.Model, mode: str) -> keras.Model:
    """``network`` (a logits network ending in a linear ``Dense`` head on ``[batch, D]`` features, Functional or
    Sequential) with its logits averaged over ``mode``'s views (module docstring). Shares every layer and weight with
    ``network``; ``mode="none"`` returns ``network`` itself.

    Raises:
        ValueError: an unknown ``mode``, a network that is already wrapped, or one without a linear ``Dense`` head.
    """
    if mode not in TEST_TIME_AUGMENTATIONS:
        raise ValueError(f"`mode` must be one of {TEST_TIME_AUGMENTATIONS}; received {mode!r}")
    if mode == "none":
        return network
    wrapped = views_of(network)
    if wrapped != "none":
        raise ValueError(f"{network.name!r} already averages over the {wrapped!r} views")
    head = linear_head(network, "test-time augmentation")
    features = keras.Model(*head_input(network, head), name=network.name + _FEATURES_SUFFIX)
    images = keras.Input(shape=tuple(network.input_shape[1:]), name="images")
    stacked = ImageViews(mode, name="test_time_views")(images)
    averaged = ViewAverage(mode, name="view_average")(features(stacked))
    return keras.Model(images, head(averaged), name=network.name)


def without_test_time_augmentation(network: keras.Model) -> keras.Model:
    """The single-view network inside a wrapped ``network`` (the same layers and weights), or ``network`` itself when
    it is not wrapped: what a fine-tune trains."""
    parts = _parts(network)
    if parts is None:
        return network
    _, features, head = parts
    return keras.Model(features.input, head(features.output), name=network.name)


def view_weights(mode: str) -> Sequence[float]:
    """The views' weights of ``mode`` (they sum to 1)."""
    return tuple(float(weight) for _, _, weight in _views(mode))


def jem_with_views(model, mode: str):
    """A :class:`~jem_tf.JEM` like ``model`` (its settings, replay buffer, seed state and refinement) whose backbone is
    ``model``'s wrapped by :func:`with_test_time_augmentation`, with the same weights; ``model`` itself for
    ``mode="none"``. The new model is not compiled (call ``compile`` before ``fit``, ``evaluate`` or ``predict``
    under a strategy as usual); ``model`` is unchanged."""
    if mode == "none":
        return model
    network = with_test_time_augmentation(model.backbone, mode)
    config = model.get_config()
    config["backbone"] = keras.saving.serialize_keras_object(network)
    wrapped = type(model).from_config(config)
    wrapped.backbone.set_weights(network.get_weights())
    for source, target in ((model.replay_buffer, wrapped.replay_buffer), (model.seed_state, wrapped.seed_state)):
        for value, variable in zip(source.variables, target.variables):
            variable.assign(value)
    return wrapped
