"""Every place jem-tf leans on a private Keras API, each with why and how long.

Each workaround has a test in ``tests/test_keras_workarounds.py`` that fails the day Keras no longer needs it
(the private API is gone, or the public path now does the job); the failure message says which workaround
can go. Keras 3.x, TensorFlow backend.

* :func:`build_for_distributed_fit`: the body of ``JEM._maybe_symbolic_build``, an override of a private
  Keras trainer hook (keras-team/keras#20585).
* :func:`step_logs`: step logs of shape ``[1]`` under ``MultiWorkerMirroredStrategy`` (the same issue's
  family).
* :func:`all_layers`: every nested layer (``Layer._flatten_layers``; ``Model.layers`` is the top level only).
* :func:`learning_rate_or_schedule`: an optimizer's schedule itself (``optimizer._learning_rate``; the public
  ``learning_rate`` is its current value).
* :func:`set_initial_epoch`: the epoch ``fit`` resumes at, set from a callback (``model._initial_epoch``, as
  Keras's own ``BackupAndRestore`` does).
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import keras
import tensorflow as tf


def build_for_distributed_fit(model: keras.Model) -> None:
    """What a fully built JEM needs from Keras's symbolic build: its optimizer's variables and Keras's post-build
    hook. ``JEM._maybe_symbolic_build`` (which ``fit``/``evaluate`` call) runs this instead of Keras's.

    Why (keras-team/keras#20585): under a strategy, Keras's TF trainer pulls a batch and reduces it across
    replicas to build the model symbolically; under ``MultiWorkerMirroredStrategy`` that fails on the
    ``PerReplica`` batch of a subclassed model. A JEM is fully built in ``__init__`` and compiles no losses, so
    the symbolic build has nothing to do but build the optimizer and the metrics given to ``compile`` (on
    symbolic labels ``[None]`` and logits ``[None, K]``, in the strategy's scope, since a metric's variables
    cannot be created inside the compiled step) and call ``_post_build``.
    """
    compiled = compiled_metrics(model)
    with model.distribute_strategy.scope():
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        if compiled is not None and not compiled.built:
            compiled.build(keras.KerasTensor((None,), "int32"), keras.KerasTensor((None, model.num_classes), "float32"))
    model._post_build()


def compiled_metrics(model: keras.Model) -> Optional[keras.metrics.Metric]:
    """The container of the metrics given to ``model.compile(metrics=..., weighted_metrics=...)``, or ``None``.

    Why: a custom ``train_step`` that computes its own loss updates them itself; Keras 3 keeps the container in
    the private ``_compile_metrics`` (its public ``compute_metrics`` also evaluates every metric's result).
    """
    return model._compile_metrics


def step_logs(metrics: Iterable[keras.metrics.Metric]) -> dict:
    """``{name: result}`` of ``metrics``, what a ``train_step``/``test_step`` returns.

    Why (keras-team/keras#20585 family): under a multi-worker ``MultiWorkerMirroredStrategy`` Keras reduces step
    logs with ``strategy.reduce("MEAN", v, axis=0)``, which fails on scalars; shape-[1] logs reduce to the same
    scalar.
    """
    logs = {}
    for metric in metrics:
        result = metric.result()
        logs.update(result if isinstance(result, dict) else {metric.name: result})  # compiled metrics: a dict
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def all_layers(model: keras.layers.Layer) -> List[keras.layers.Layer]:
    """Every layer inside ``model``, nested ones included (and ``model`` itself).

    Why: Keras has no public recursive walk (``Model.layers`` lists the top level only, so a batch-norm layer
    inside a nested block would be missed); ``Layer._flatten_layers`` is what Keras uses itself.
    """
    return list(model._flatten_layers())


def learning_rate_or_schedule(optimizer: keras.optimizers.Optimizer):
    """The optimizer's learning rate as configured: its ``LearningRateSchedule`` itself, or the variable.

    Why: the public ``optimizer.learning_rate`` evaluates a schedule at the current step, and there is no public
    getter of the schedule (needed to wrap it, e.g. to scale it after a divergence).
    """
    return optimizer._learning_rate


def set_initial_epoch(model: keras.Model, epoch: int) -> None:
    """Makes the running ``fit`` start at ``epoch`` (when called from a callback's ``on_train_begin``).

    Why: ``fit``'s public ``initial_epoch`` is read before the callbacks run, so a callback restoring a backup
    cannot set it; Keras's own ``BackupAndRestore`` sets ``model._initial_epoch``, which ``fit`` reads after
    ``on_train_begin``.
    """
    model._initial_epoch = epoch
