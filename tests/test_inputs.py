"""jem_tf.data.inputs: what the model and the export accept, and the errors naming what they received."""

import types

import numpy as np
import pytest
import tensorflow as tf

from jem_tf.data import inputs

SPEC = dict(image_shape=(2, 2, 1), num_classes=3, value_range=(-1.0, 1.0))


def _images(n=4, value=0.0):
    return np.full((n, 2, 2, 1), value, np.float32)


def _model(jit_compile=False, validate_inputs=True):
    """What the fit/evaluate checks read of a JEM."""
    return types.SimpleNamespace(**SPEC, validate_inputs=validate_inputs, jit_compile=jit_compile)


def test_static_shape_tuple():
    assert inputs.static_shape_tuple(None) is None
    assert inputs.static_shape_tuple((None, 3)) is None
    assert inputs.static_shape_tuple(tf.TensorShape([8, 8, 1])) == (8, 8, 1)


@pytest.mark.parametrize("value_range", [(1, 0), (0, 0), (0, 1, 2), (0,)])
def test_check_value_range_names_the_bad_range(value_range):
    with pytest.raises(ValueError, match=r"`value_range` must be \(low, high\) with low < high; received"):
        inputs.check_value_range(value_range)


def test_check_value_range_returns_floats():
    assert inputs.check_value_range([0, 255]) == (0.0, 255.0)


# ----------------------------------------------------------------------------- eager checks of numpy arrays
def test_check_arrays_accepts_valid_inputs_within_the_rounding_tolerance():
    inputs.check_arrays(_images(value=1.0 + inputs.RANGE_TOLERANCE), np.array([0, 1, 2, 2]), **SPEC)
    inputs.check_arrays(_images(), np.array([[0], [1], [2], [0]]), **SPEC)  # [N, 1] labels
    inputs.check_arrays(_images(0), np.zeros(0), **SPEC)  # an empty set has nothing to check
    inputs.check_arrays(_images().astype(np.uint8), **SPEC)  # integer images, no labels


@pytest.mark.parametrize("images, labels, match", [
    (np.zeros((4, 2, 2)), None, r"\[N, 2, 2, 1\]; received \(4, 2, 2\)"),
    (np.zeros((4, 2, 3, 1)), None, r"received \(4, 2, 3, 1\)"),
    (np.full((4, 2, 2, 1), "a"), None, "numeric; received dtype <U1"),
    (_images(value=np.nan), None, "NaN"),
    (_images(value=1.01), None, r"\[-1.0, 1.0\].*received values in \[1.01, 1.01\]"),
    (_images(), np.zeros(3), r"Labels must have shape \[4\]; received \(3,\)"),
    (_images(), np.array([0, 1, 3, 0]), "received label 3"),
    (_images(), np.array([0, -2, 1, 0]), "received label -2"),
    (_images(), np.array([0, 1.5, 1, 0]), "received label 1.5"),
])
def test_check_arrays_names_the_bad_value(images, labels, match):
    with pytest.raises(ValueError, match=match):
        inputs.check_arrays(images, labels, **SPEC)


# ----------------------------------------------------------------------------- a compiled step's batch
def test_prepare_batch_casts_and_squeezes():
    x, y = inputs.prepare_batch(_images().astype(np.float64), np.array([[0], [1], [2], [1]]), **SPEC)
    assert x.dtype == tf.float32 and y.dtype == tf.int32 and y.shape == (4,)
    np.testing.assert_array_equal(y.numpy(), [0, 1, 2, 1])
    _, y = inputs.prepare_batch(_images(), np.array([0.0, 1.0, 2.0, 1.0], np.float32), **SPEC)  # integral floats
    np.testing.assert_array_equal(y.numpy(), [0, 1, 2, 1])


@pytest.mark.parametrize("images, labels, match", [
    (np.zeros((4, 2, 2), np.float32), np.zeros(4), r"rank 4\); received a batch of shape \(4, 2, 2\)"),
    (np.zeros((4, 2, 3, 1), np.float32), np.zeros(4), r"received \(4, 2, 3, 1\)"),
    (np.full((4, 2, 2, 1), "a"), np.zeros(4), "numeric; received dtype string"),
    (_images(), None, "needs labels"),
    (_images(), np.zeros((4, 2)), r"shape \[batch\]; received shape \(4, 2\)"),
    (_images(), np.array(["a"] * 4), "integer class ids; received dtype string"),
])
def test_prepare_batch_static_errors_name_the_received_value(images, labels, match):
    with pytest.raises(ValueError, match=match):
        inputs.prepare_batch(images, labels, **SPEC)


@pytest.mark.parametrize("images, labels, match", [
    (_images(value=3.0), np.zeros(4, np.int32), r"(?s)must lie in \[-1.0, 1.0\]; found a maximum of.*\[3\.\]"),
    (_images(value=-3.0), np.zeros(4, np.int32), r"(?s)found a minimum of.*\[-3\.\]"),
    (_images(value=np.inf), np.zeros(4, np.int32), "NaN or infinite"),
    (_images(), np.array([0, 1, 7, 0], np.int32), r"(?s)num_classes=3\); found a label.*\[7\]"),
    (_images(), np.array([0, -1, 2, 0], np.int32), r"(?s)found a label.*\[-1\]"),
    (_images(), np.array([0, 0.5, 1, 0], np.float32), "integer class ids"),
])
def test_prepare_batch_value_errors_in_graph_name_the_value(images, labels, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        inputs.prepare_batch(images, labels, **SPEC)
    # validate=False: static checks only.
    x, _ = inputs.prepare_batch(images, labels, **SPEC, validate=False)
    assert x.shape == images.shape


def test_image_checks_in_graph():
    images = tf.constant(_images(value=0.5))
    np.testing.assert_array_equal(inputs.check_images_in_graph(images, (-1.0, 1.0)).numpy(), images.numpy())
    inputs.check_images_in_graph(images + 0.5 + inputs.RANGE_TOLERANCE, (-1.0, 1.0))  # within the tolerance
    with pytest.raises(tf.errors.InvalidArgumentError, match="found a maximum of"):
        inputs.check_images_in_graph(images + 0.6, (-1.0, 1.0))
    np.testing.assert_array_equal(inputs.check_image_shape_in_graph(images, (2, 2, 1)).numpy(), images.numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)\[N, 2, 2, 1\].*received shape.*4, 2, 2$"):
        inputs.check_image_shape_in_graph(tf.zeros([4, 2, 2]), (2, 2, 1))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)received shape.*4, 2, 2, 1, 1$"):
        inputs.check_image_shape_in_graph(tf.zeros([4, 2, 2, 1, 1]), (2, 2, 1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="the batch is empty"):
        inputs.check_image_shape_in_graph(tf.zeros([0, 2, 2, 1]), (2, 2, 1))


# ----------------------------------------------------------------------------- a model's fit and evaluate
def test_datasets_get_pipeline_checks_only_under_xla():
    bad = tf.data.Dataset.from_tensor_slices((_images(value=5.0), np.zeros(4, np.int32))).batch(2)
    for model in (_model(jit_compile=False), _model(jit_compile=True, validate_inputs=False)):
        assert inputs.checked_in_pipeline(model, bad) is bad  # the compiled step checks (or nothing does)
    checked = inputs.checked_in_pipeline(_model(jit_compile=True), bad)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"must lie in \[-1.0, 1.0\]"):
        list(checked)
    bad_labels = tf.data.Dataset.from_tensor_slices((_images(), np.full(4, 3, np.int32))).batch(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes=3"):
        list(inputs.checked_in_pipeline(_model(jit_compile=True), bad_labels))
    bare = tf.data.Dataset.from_tensor_slices(_images(value=np.nan)).batch(2)  # images without labels
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN"):
        list(inputs.checked_in_pipeline(_model(jit_compile=True), bare))
    good = tf.data.Dataset.from_tensor_slices((_images(value=0.25), np.arange(4) % 3)).batch(2)
    elements = list(inputs.checked_in_pipeline(_model(jit_compile=True), good))  # passed unchanged
    np.testing.assert_array_equal(np.concatenate([x for x, _ in elements]), _images(value=0.25))
    np.testing.assert_array_equal(np.concatenate([y for _, y in elements]), np.arange(4) % 3)


def test_in_memory_checks_numpy_always_tensors_under_xla():
    bad = _images(value=2.0)
    with pytest.raises(ValueError, match=r"received values in \[2, 2\]"):
        inputs.check_in_memory(_model(), bad)
    inputs.check_in_memory(_model(), tf.constant(bad))  # the compiled step checks tensors without XLA
    with pytest.raises(ValueError, match=r"received values in \[2, 2\]"):
        inputs.check_in_memory(_model(jit_compile=True), tf.constant(bad))
    inputs.check_in_memory(_model(validate_inputs=False), bad)  # validate_inputs=False: nothing


def test_fit_inputs_checks_validation_data_and_leaves_the_arguments_alone():
    model = _model()
    with pytest.raises(ValueError, match="received label 5"):
        inputs.fit_inputs(model, _images(), np.zeros(4), {"validation_data": (_images(), np.full(4, 5))})
    kwargs = {"validation_data": tf.data.Dataset.from_tensor_slices((_images(), np.zeros(4, np.int32))).batch(2),
              "epochs": 2}
    x, checked = inputs.fit_inputs(model, _images(), np.zeros(4), kwargs)
    assert checked == kwargs and x.shape == (4, 2, 2, 1)  # without XLA nothing is mapped
    _, checked = inputs.fit_inputs(_model(jit_compile=True), _images(), np.zeros(4), kwargs)
    assert checked["validation_data"] is not kwargs["validation_data"] and checked["epochs"] == 2
    assert kwargs["validation_data"] is not checked["validation_data"]  # the caller's dict is not modified
    with pytest.raises(ValueError, match=r"received \(4, 2, 2\)"):
        inputs.evaluate_inputs(model, np.zeros((4, 2, 2), np.float32), None)


def test_single_batches_are_checked_eagerly_under_xla_only():
    inputs.check_batch(_model(), [[[[9.0]] * 2] * 2] * 4, np.zeros(4))  # the step checks it
    with pytest.raises(ValueError, match=r"received values in \[9, 9\]"):
        inputs.check_batch(_model(jit_compile=True), [[[[9.0]] * 2] * 2] * 4, np.zeros(4))
    with pytest.raises(ValueError, match="received label 4"):
        inputs.check_batch(_model(jit_compile=True), tf.constant(_images()), np.full(4, 4))
