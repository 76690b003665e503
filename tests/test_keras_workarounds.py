"""jem_tf.keras_workarounds: each workaround works, and its test fails the day Keras no longer needs it."""

import inspect
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_jem
from keras.src.backend.tensorflow import trainer as keras_tf_trainer  # the private code the workarounds answer

from jem_tf import keras_workarounds


# ----------------------------------------------------------------------------- build_for_distributed_fit
def test_build_for_distributed_fit_builds_the_optimizer():
    model = tiny_jem()
    assert not model.optimizer.built
    keras_workarounds.build_for_distributed_fit(model)
    assert model.optimizer.built and len(model.optimizer.variables) > 1


def test_keras_still_builds_symbolically_by_reducing_a_batch_across_replicas():
    # keras-team/keras#20585: under a strategy, Keras's TF trainer reduces a PerReplica batch to build the model
    # symbolically, which fails for a subclassed model under MultiWorkerMirroredStrategy.
    hook = getattr(keras.Model, "_maybe_symbolic_build", None)
    assert hook is not None and "_maybe_symbolic_build" in inspect.getsource(keras.Model.fit), (
        "Keras's fit no longer calls Model._maybe_symbolic_build: JEM's override of it (and "
        "keras_workarounds.build_for_distributed_fit) is dead code and can go.")
    assert "distribute_strategy.reduce(" in inspect.getsource(hook), (
        "Keras's _maybe_symbolic_build no longer reduces the batch across replicas (keras-team/keras#20585): JEM's "
        "override and keras_workarounds.build_for_distributed_fit may go; check tests/test_distribution.py's "
        "multi-worker tests without them.")
    assert callable(getattr(keras.Model, "_post_build", None)), (
        "Keras removed Model._post_build: keras_workarounds.build_for_distributed_fit must follow its replacement.")


# ----------------------------------------------------------------------------- step_logs
def test_step_logs_are_scalars_and_shape_one_under_multi_worker():
    mean = keras.metrics.Mean(name="loss")
    mean.update_state([1.0, 3.0])
    logs = keras_workarounds.step_logs([mean])
    assert list(logs) == ["loss"] and logs["loss"].shape == () and float(logs["loss"]) == 2.0
    multi_worker = mock.create_autospec(tf.distribute.MultiWorkerMirroredStrategy, instance=True)
    with mock.patch.object(tf.distribute, "get_strategy", return_value=multi_worker):
        logs = keras_workarounds.step_logs([mean])
    assert logs["loss"].shape == (1,) and float(logs["loss"][0]) == 2.0


def test_keras_still_reduces_multi_worker_logs_along_an_axis_scalars_lack():
    multi_worker = mock.create_autospec(tf.distribute.MultiWorkerMirroredStrategy, instance=True)
    multi_worker.extended._in_multi_worker_mode.return_value = True
    keras_tf_trainer.reduce_per_replica({"loss": tf.constant(2.0)}, multi_worker, "auto")
    calls = [c for c in multi_worker.reduce.call_args_list if c.kwargs.get("axis") == 0 and c.args[1].shape == ()]
    assert calls, ("Keras no longer reduces scalar step logs along axis 0 under a multi-worker "
                   "MultiWorkerMirroredStrategy: keras_workarounds.step_logs may return scalars (drop its reshape to "
                   "[1]); check tests/test_distribution.py's multi-worker tests without it.")
    with pytest.raises(ValueError, match="Invalid reduction dimension 0"):  # what such a reduce does to a scalar
        tf.distribute.get_strategy().reduce("MEAN", tf.constant(2.0), axis=0)


# ----------------------------------------------------------------------------- all_layers
def _nested_batch_norm_model():
    inputs = keras.Input((4, 4, 1))
    block = keras.Sequential([keras.layers.Conv2D(2, 3, padding="same"), keras.layers.BatchNormalization()])
    return keras.Model(inputs, keras.layers.Flatten()(block(inputs)))


def test_all_layers_finds_nested_layers_that_model_layers_misses():
    model = _nested_batch_norm_model()
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in keras_workarounds.all_layers(model))
    assert model in keras_workarounds.all_layers(model)
    assert callable(getattr(keras.layers.Layer, "_flatten_layers", None)), (
        "Keras removed Layer._flatten_layers: keras_workarounds.all_layers must use its public replacement.")
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers), (
        "Keras's public Model.layers now lists nested layers: keras_workarounds.all_layers can use it instead of "
        "the private Layer._flatten_layers.")


# ----------------------------------------------------------------------------- learning_rate_or_schedule
def test_learning_rate_or_schedule_returns_the_schedule_the_public_property_does_not():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    optimizer = keras.optimizers.SGD(schedule)
    assert keras_workarounds.learning_rate_or_schedule(optimizer) is schedule
    assert not isinstance(optimizer.learning_rate, keras.optimizers.schedules.LearningRateSchedule), (
        "Keras's public optimizer.learning_rate now returns the schedule itself: "
        "keras_workarounds.learning_rate_or_schedule can use it instead of optimizer._learning_rate.")
    constant = keras.optimizers.SGD(0.25)
    assert float(keras_workarounds.learning_rate_or_schedule(constant).numpy()) == 0.25


# ----------------------------------------------------------------------------- set_initial_epoch
class _ResumeAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.seen = epoch, []

    def on_train_begin(self, logs=None):
        keras_workarounds.set_initial_epoch(self.model, self.epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


def test_set_initial_epoch_from_a_callback_skips_the_done_epochs():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    resume = _ResumeAt(2)
    history = model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=4, verbose=0, callbacks=[resume])
    assert resume.seen == [2, 3], (
        "Keras's fit no longer starts at model._initial_epoch set in on_train_begin: "
        "keras_workarounds.set_initial_epoch (and jem_tf.training.callbacks' resume) must follow Keras's new "
        "mechanism.")
    assert len(history.history["loss"]) == 2
    assert "_initial_epoch" in inspect.getsource(keras.callbacks.BackupAndRestore), (
        "Keras's own BackupAndRestore no longer sets model._initial_epoch: see how it resumes now and update "
        "keras_workarounds.set_initial_epoch.")
