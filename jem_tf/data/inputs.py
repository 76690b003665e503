"""Input checks shared by the model and its serving export.

A JEM's inputs are images ``[batch, *image_shape]`` in a documented ``value_range`` and class ids in
``[0, num_classes)``. Bad inputs are rejected with a message that names the bad value:

* :func:`check_value_range`: a ``(low, high)`` value range itself (the model's, its buffer's, its
  chain initialisation's);
* :func:`check_arrays`: eagerly, for numpy arrays (``JEM.fit``, calibration data);
* :func:`prepare_batch`: in a compiled training/test step, static shape checks at trace time and
  in-graph value checks;
* :func:`check_images_in_graph`: the in-graph range/finiteness check alone (also used by the exported
  signatures);
* :func:`check_image_shape_in_graph`: the full image shape, in-graph (the exported signatures: serving
  runtimes do not enforce a SignatureDef's shape);
* :func:`prepare_model_batch`: :func:`prepare_batch` for a model's training/test step;
* :func:`fit_inputs`, :func:`evaluate_inputs`, :func:`check_batch`: what a model's ``fit``, ``evaluate`` and
  ``train_on_batch``/``test_on_batch`` check before Keras sees the data, in every compile mode (XLA drops the
  in-graph checks, so under XLA datasets get them in their pipeline and tensors are checked eagerly).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

# Inputs may exceed the documented value range by this fraction of its width (rounding).
RANGE_TOLERANCE = 1e-3


def static_shape_tuple(shape) -> Optional[tuple]:
    """``shape`` as a tuple of ints, or ``None`` when it is unknown or has a dynamic dimension."""
    if shape is None:
        return None
    shape = tuple(shape)
    if any(d is None for d in shape):
        return None
    return tuple(int(d) for d in shape)


def check_value_range(value_range: Sequence[float]) -> Tuple[float, float]:
    """``value_range`` as a ``(low, high)`` tuple of floats; ``ValueError`` unless it is two numbers with
    ``low < high``."""
    value_range = tuple(float(v) for v in value_range)
    if len(value_range) != 2 or not value_range[0] < value_range[1]:
        raise ValueError(f"`value_range` must be (low, high) with low < high; received {value_range!r}")
    return value_range


def check_images_in_graph(images: tf.Tensor, value_range: Sequence[float]) -> tf.Tensor:
    """``images`` behind in-graph checks that they are finite and in ``value_range`` (up to a rounding
    tolerance); a failed check raises ``InvalidArgumentError`` naming the range and the offending value.
    Used by the training/test steps and by the exported serving signatures."""
    low, high = value_range
    tolerance = RANGE_TOLERANCE * (high - low)
    checks = [
        tf.debugging.assert_all_finite(images, message="images contain NaN or infinite values"),
        tf.debugging.assert_greater_equal(
            tf.reduce_min(images), low - tolerance, message=f"images must lie in [{low}, {high}]; found a minimum of"),
        tf.debugging.assert_less_equal(
            tf.reduce_max(images), high + tolerance, message=f"images must lie in [{low}, {high}]; found a maximum of"),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(images)


def check_image_shape_in_graph(images: tf.Tensor, image_shape: Sequence[int]) -> tf.Tensor:
    """``images`` behind in-graph checks that their shape is ``[N, *image_shape]`` with ``N >= 1``; a failed check
    raises ``InvalidArgumentError`` naming the expected shape (and, for ``N = 0``, that the batch is empty).

    The signatures' input spec says the same, but neither ``tf.saved_model.load`` nor TF Serving's C++ loader
    enforces its shape. The check reads the runtime shape only (no ``Rank``/``Size`` op, which graph optimizers
    fold from the declared input shape): missing dimensions are padded with -1.
    """
    image_shape = [int(d) for d in image_shape]
    rank = len(image_shape) + 1
    expected = f"[N, {', '.join(map(str, image_shape))}]"
    shape = tf.shape(images, out_type=tf.int32)
    padded = tf.concat([shape, tf.fill([rank + 1], -1)], 0)  # real dimensions are >= 0
    shape_ok = tf.logical_and(tf.reduce_all(tf.equal(padded[1:rank], image_shape)), tf.equal(padded[rank], -1))
    shape_check = tf.debugging.Assert(
        shape_ok, [f"images must have shape {expected} (float32, N >= 1); received shape", shape], summarize=16)
    with tf.control_dependencies([shape_check]):  # after the shape check: an empty batch has the right rank
        batch_check = tf.debugging.Assert(
            padded[0] >= 1, [f"images must have shape {expected} with N >= 1; the batch is empty"])
    with tf.control_dependencies([shape_check, batch_check]):
        return tf.identity(images)


def prepare_batch(x, y, *, image_shape: Sequence[int], num_classes: int, value_range: Sequence[float],
                  validate: bool = True) -> Tuple[tf.Tensor, tf.Tensor]:
    """Checks a training/test batch: shapes and dtypes statically (``ValueError`` at trace time), and
    with ``validate`` the image range and label ids in-graph. Returns float32 images, int32 labels."""
    image_shape = tuple(image_shape)
    x = tf.convert_to_tensor(x)
    if x.shape.rank != len(image_shape) + 1:
        raise ValueError(
            f"Images must have shape [batch, {', '.join(map(str, image_shape))}] (rank "
            f"{len(image_shape) + 1}); received a batch of shape {x.shape}."
        )
    if any(s is not None and s != e for s, e in zip(x.shape[1:], image_shape)):
        raise ValueError(f"Images must have shape [batch, {image_shape}]; received {x.shape}.")
    if not (x.dtype.is_floating or x.dtype.is_integer):
        raise ValueError(f"Images must be numeric; received dtype {x.dtype.name}.")
    x = tf.cast(x, tf.float32)
    if y is None:
        raise ValueError("JEM training needs labels: pass (images, labels).")
    y = tf.convert_to_tensor(y)
    if y.shape.rank == 2 and y.shape[-1] == 1:
        y = tf.squeeze(y, axis=-1)
    if y.shape.rank != 1:
        raise ValueError(f"Labels must be class ids of shape [batch]; received shape {y.shape}.")
    if y.dtype.is_floating:
        if validate:
            tf.debugging.assert_equal(y, tf.round(y), message="Labels must be integer class ids.")
    elif not y.dtype.is_integer:
        raise ValueError(f"Labels must be integer class ids; received dtype {y.dtype.name}.")
    y = tf.cast(y, tf.int32)
    if validate:
        x = check_images_in_graph(x, value_range)
        checks = [
            tf.debugging.assert_greater_equal(
                tf.reduce_min(y), 0, message="Labels must be in [0, num_classes); found a label"),
            tf.debugging.assert_less(
                tf.reduce_max(y), num_classes,
                message=f"Labels must be in [0, num_classes={num_classes}); found a label"),
        ]
        with tf.control_dependencies(checks):
            x = tf.identity(x)
    return x, y


def check_arrays(x, y=None, *, image_shape: Sequence[int], num_classes: int,
                 value_range: Sequence[float]) -> None:
    """Eagerly checks numpy images/labels, raising ``ValueError`` naming the bad value."""
    image_shape = tuple(image_shape)
    x = np.asarray(x)
    if x.ndim != len(image_shape) + 1 or tuple(x.shape[1:]) != image_shape:
        raise ValueError(
            f"Images must have shape [N, {', '.join(map(str, image_shape))}]; received {x.shape}."
        )
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"Images must be numeric; received dtype {x.dtype}.")
    if x.size:
        low, high = value_range
        tol = RANGE_TOLERANCE * (high - low)
        if not np.all(np.isfinite(x)):
            raise ValueError("Images contain NaN or infinite values.")
        x_min, x_max = float(x.min()), float(x.max())
        if x_min < low - tol or x_max > high + tol:
            raise ValueError(
                f"Images must lie in [{low}, {high}] (scale them first); received values in "
                f"[{x_min:g}, {x_max:g}]."
            )
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"Labels must have shape [{len(x)}]; received {y.shape}.")
        if y.size and (np.any(y != np.round(y)) or y.min() < 0 or y.max() >= num_classes):
            bad = y[(y != np.round(y)) | (y < 0) | (y >= num_classes)][0].item()
            raise ValueError(
                f"Labels must be integer class ids in [0, {num_classes}); received label {bad!r}."
            )


# ----------------------------------------------------------------------------- a model's fit and evaluate
# These read a model (a jem_tf.JEM) through `image_shape`, `num_classes`, `value_range`, `validate_inputs` and
# Keras's `jit_compile`.
def model_spec(model) -> dict:
    """``image_shape``, ``num_classes`` and ``value_range`` of ``model``: the keyword arguments of the checks."""
    return dict(image_shape=model.image_shape, num_classes=model.num_classes, value_range=model.value_range)


def _xla(model) -> bool:
    return bool(getattr(model, "jit_compile", False))


def prepare_model_batch(model, x, y) -> Tuple[tf.Tensor, tf.Tensor]:
    """:func:`prepare_batch` for ``model``'s training/test step (in-graph value checks when its
    ``validate_inputs`` is on)."""
    return prepare_batch(x, y, **model_spec(model), validate=model.validate_inputs)


def checked_in_pipeline(model, data):
    """``data`` with the input checks mapped into its pipeline when the model's compiled step cannot hold them
    (a ``tf.data.Dataset`` under XLA, which drops TensorFlow's in-graph ``Assert`` ops); else ``data`` as is.
    Elements ``(images, labels, ...)`` get :func:`prepare_batch`'s checks, bare images
    :func:`check_images_in_graph`'s; the elements themselves pass unchanged."""
    if not (model.validate_inputs and _xla(model) and isinstance(data, tf.data.Dataset)):
        return data

    def check(*element):
        x, rest = element[0], element[1:]
        if rest:
            checked, _ = prepare_batch(x, rest[0], **model_spec(model))
        else:
            checked = check_images_in_graph(tf.cast(x, tf.float32), model.value_range)
        with tf.control_dependencies([checked]):
            x = tf.identity(x)
        return (x, *rest) if rest else x

    return data.map(check)


def check_in_memory(model, x, y=None) -> None:
    """Checks in-memory inputs with :func:`check_arrays` before Keras sees them: numpy arrays always, tensors
    under XLA (whose compiled step drops the in-graph checks); other inputs (``tf.data``) are checked in the
    step or its pipeline. Nothing when the model's ``validate_inputs`` is off."""
    if not model.validate_inputs:
        return
    if isinstance(x, np.ndarray) or (_xla(model) and tf.is_tensor(x)):
        check_arrays(np.asarray(x), None if y is None else np.asarray(y), **model_spec(model))


def fit_inputs(model, x, y, fit_kwargs: dict):
    """``(x, fit_kwargs)`` for ``keras.Model.fit`` after the checks: ``x, y`` and a ``validation_data`` tuple
    checked in memory (:func:`check_in_memory`), datasets given their pipeline checks under XLA
    (:func:`checked_in_pipeline`). ``fit_kwargs`` is not modified."""
    check_in_memory(model, x, y)
    validation_data = fit_kwargs.get("validation_data")
    if isinstance(validation_data, tuple) and validation_data:
        check_in_memory(model, validation_data[0], validation_data[1] if len(validation_data) > 1 else None)
    if "validation_data" in fit_kwargs:
        fit_kwargs = {**fit_kwargs, "validation_data": checked_in_pipeline(model, validation_data)}
    return checked_in_pipeline(model, x), fit_kwargs


def evaluate_inputs(model, x, y):
    """``x`` for ``keras.Model.evaluate`` after the same checks as :func:`fit_inputs`."""
    check_in_memory(model, x, y)
    return checked_in_pipeline(model, x)


def check_batch(model, x, y=None) -> None:
    """The checks of ``train_on_batch``/``test_on_batch``: under XLA the batch is checked eagerly (the compiled
    step drops the in-graph checks that hold without XLA); without XLA the step checks it."""
    if _xla(model):
        check_in_memory(model, np.asarray(x) if not tf.is_tensor(x) else x, y)


class CheckedInputs:
    """The input checks of a model's ``fit``, ``evaluate``, ``train_on_batch`` and ``test_on_batch`` (a mixin before
    ``keras.Model``: ``class JEM(CheckedInputs, keras.Model)``), with the model's :func:`model_spec`."""

    def check_arrays(self, x, y=None) -> None:
        """Eagerly checks numpy images/labels, raising ``ValueError`` naming the bad value."""
        check_arrays(x, y, **model_spec(self))

    def fit(self, x=None, y=None, *args, **kwargs):
        """``keras.Model.fit``; numpy inputs (and tensors under XLA) are checked first, ``tf.data`` inputs in the
        compiled step (or, under XLA, in the input pipeline): see :func:`fit_inputs`."""
        x, kwargs = fit_inputs(self, x, y, kwargs)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """``keras.Model.evaluate`` with the same input checks as :meth:`fit`."""
        return super().evaluate(evaluate_inputs(self, x, y), y, *args, **kwargs)

    def train_on_batch(self, x, y=None, *args, **kwargs):
        """``keras.Model.train_on_batch``; under XLA the batch is checked eagerly first (see
        :mod:`jem_tf.data.inputs`)."""
        check_batch(self, x, y)
        return super().train_on_batch(x, y, *args, **kwargs)

    def test_on_batch(self, x, y=None, *args, **kwargs):
        """``keras.Model.test_on_batch`` with the same input checks as :meth:`train_on_batch`."""
        check_batch(self, x, y)
        return super().test_on_batch(x, y, *args, **kwargs)
