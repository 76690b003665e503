"""Hyperparameter search with keras-tuner: ``build_hypermodel`` and ``run_search``.

The search space covers what JEM is sensitive to (SGLD step size, noise and steps, buffer restart
probability, learning rate, p(x) weight, L2 energy weight, warm-up). Every trial trains with the
stability guard; a trial that diverges beyond its rollbacks is recorded as *failed* (keras-tuner's
``FailedTrialError``) and the search goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from typing import Callable, Dict, Optional

import keras
import numpy as np

from jem_tf.choices import TUNERS
from jem_tf.choices import TUNING_OBJECTIVES as OBJECTIVES
from jem_tf.data import ImageDataset
from jem_tf.errors import UsageError, as_usage_error, import_extra
from jem_tf.files import atomic_write_bytes, atomic_write_json
from jem_tf.model.conversion import logits_network
from jem_tf.ood import OODScorer, auroc
from jem_tf.run.config import TrainConfig, field_names
from jem_tf.run.model_files import load_classifier, with_energy_l2_center
from jem_tf.run.splits import RunSplits, Split, run_splits
from jem_tf.sampling.distribution import make_strategy
from jem_tf.training.factories import (
    build_datasets,
    build_jem,
    build_stability_guard,
    compile_jem,
    resolve_config_precision,
    steps_per_epoch,
)

# The optional dependency of this module (the `tune` extra): without it, importing it is one UsageError.
keras_tuner = import_extra("keras_tuner",
                           needed_for="Hyperparameter search (python -m jem_tf.tune, jem_tf.training.tuning)")

# name -> spec. "float"/"int": a range (log sampling where marked); "choice": a list of values.
DEFAULT_SEARCH_SPACE: Dict[str, dict] = {
    "sgld_step_size": {"type": "float", "min": 0.1, "max": 3.0, "sampling": "log"},
    "sgld_noise_std": {"type": "float", "min": 0.001, "max": 0.05, "sampling": "log"},
    "sgld_steps": {"type": "int", "min": 5, "max": 40, "step": 5},
    "restart_prob": {"type": "float", "min": 0.01, "max": 0.1, "sampling": "log"},
    "learning_rate": {"type": "float", "min": 1e-4, "max": 3e-3, "sampling": "log"},
    "px_weight": {"type": "float", "min": 0.1, "max": 1.0},
    "energy_l2_weight": {"type": "choice", "values": [0.0, 0.01, 0.1]},
    "warmup_steps": {"type": "choice", "values": [0, 100, 1000]},
}


def search_space(overrides: Optional[dict] = None, fixed=()) -> Dict[str, dict]:
    """The default space with ``overrides`` (name -> spec, or ``None`` to drop a name) applied and the
    names in ``fixed`` removed (they keep the recipe's value)."""
    space = copy.deepcopy(DEFAULT_SEARCH_SPACE)
    for name, spec in (overrides or {}).items():
        if name not in field_names():
            raise UsageError(f"Search space entry {name!r} is not a config field.")
        if spec is None:
            space.pop(name, None)
            continue
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "choice"):
            raise UsageError(f"Search space entry {name!r} must be a dict with type float, int or choice; "
                             f"received {spec!r}")
        _check_spec(name, spec)
        space[name] = spec
    for name in fixed:
        if name not in space:
            raise UsageError(f"Cannot fix {name!r}: it is not in the search space ({', '.join(space)}).")
        space.pop(name)
    return space


def _check_spec(name: str, spec: dict) -> None:
    """``UsageError`` naming the entry unless keras-tuner can sample ``spec``: a non-empty list of distinct choices,
    or finite numbers ``min <= max`` (integers for int; ``min > 0`` for log sampling; a step > 0)."""
    def fail(why):
        raise UsageError(f"Search space entry {name!r}: {why}; received {spec!r}")

    if spec["type"] == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            fail("a choice needs a non-empty list of values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            fail("a choice lists a value more than once")
        return
    low, high = spec.get("min"), spec.get("max")
    number = int if spec["type"] == "int" else (int, float)
    for key, value in (("min", low), ("max", high)):
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
            fail(f"{key} must be a finite {'integer' if spec['type'] == 'int' else 'number'}")
    if low > high:
        fail(f"min ({low}) is more than max ({high})")
    sampling = spec.get("sampling", "linear")
    if sampling not in ("linear", "log", "reverse_log"):
        fail("sampling must be linear, log or reverse_log")
    if sampling != "linear" and low <= 0:
        fail(f"{sampling} sampling needs min > 0")
    step = spec.get("step", 1 if spec["type"] == "int" else None)
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or not step > 0):
        fail("step must be a number > 0")


def _hyperparameter(hp: keras_tuner.HyperParameters, name: str, spec: dict):
    if spec["type"] == "choice":
        return hp.Choice(name, spec["values"])
    if spec["type"] == "int":
        return hp.Int(name, spec["min"], spec["max"], step=spec.get("step", 1))
    return hp.Float(name, spec["min"], spec["max"], sampling=spec.get("sampling", "linear"))


def ood_auroc(model, in_distribution: np.ndarray, *, seed: int = 0, scorer: Optional[OODScorer] = None) -> float:
    """AUROC of ``log p(x)`` (:mod:`jem_tf.ood`) separating ``in_distribution`` (positive) from as many
    uniform-noise images. ``scorer``: the model's :class:`~jem_tf.ood.OODScorer`, when the caller keeps one
    (its compiled function is then traced once, not on every call)."""
    noise = np.random.default_rng(seed).uniform(*model.value_range, size=in_distribution.shape).astype("float32")
    scorer = scorer or OODScorer(model.backbone, value_range=model.value_range)
    scores = [scorer.arrays(x, ["log_px"], batch_size=512)["log_px"] for x in (in_distribution, noise)]
    return auroc(*scores)


class BestEpochCheckpoint(keras.callbacks.Callback):
    """Saves a trial's best epoch (by ``objective``): the backbone's weights only, or the whole JEM with
    its replay buffer when ``include_buffer``."""

    def __init__(self, filepath: str, objective: keras_tuner.Objective, include_buffer: bool = False):
        super().__init__()
        self.filepath, self.objective, self.include_buffer = filepath, objective, include_buffer
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.objective.name)
        if value is None or not np.isfinite(value):
            return
        if self.best is None or self.objective.better_than(value, self.best):
            self.best = value
            target = self.model if self.include_buffer else self.model.backbone
            target.save_weights(self.filepath)


class JEMHyperModel(keras_tuner.HyperModel):
    """A keras-tuner ``HyperModel`` of JEMs around a base :class:`TrainConfig`.

    Args:
        base_config: The recipe; hyperparameters override its fields.
        data: The recipe's dataset; every trial trains on its :func:`~jem_tf.run.splits.run_splits` (train,
            validation and, for a semi-supervised recipe, the labelled images), as ``python -m jem_tf.train`` does.
        space: Search space (see :func:`search_space`).
        objective: ``"val_accuracy"`` or ``"combined"`` (validation accuracy + OOD AUROC of log p(x)
            against uniform noise; for users who care about the density).
        save_buffers: Keep each trial's replay buffer in its checkpoint. Default False (it is large).
        verbose: Keras ``fit`` verbosity inside trials.
    """

    def __init__(self, base_config: TrainConfig, data: ImageDataset, *, space: Optional[Dict[str, dict]] = None,
                 objective: str = "val_accuracy", save_buffers: bool = False, verbose=0):
        super().__init__(name="jem")
        if objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}; received {objective!r}")
        if base_config.validation_fraction <= 0:
            raise UsageError("Tuning needs a validation split: validation_fraction must be > 0.")
        train_images = run_splits(base_config, data).train.images
        # A conversion (init_from): every trial starts from a fresh copy of the classifier's logits network, and
        # its energy L2 term (when a trial turns it on) is centred on the classifier's mean energy.
        self.source = None if base_config.init_from is None else load_classifier(
            base_config.init_from, image_shape=data.image_shape, num_classes=data.num_classes,
            sha256=base_config.init_from_sha256, images=train_images)
        base_config = with_energy_l2_center(base_config, self.source, train_images)
        # precision "auto" is measured once for the whole search (every trial uses the same backbone).
        self.base_config, _ = resolve_config_precision(
            base_config.validate(), image_shape=data.image_shape, num_classes=data.num_classes,
            backbone=None if self.source is None else self.source.network)
        self.space = search_space() if space is None else space
        self.objective = objective
        self.save_buffers = save_buffers
        self.verbose = verbose
        self.data = data
        self.splits: RunSplits = run_splits(self.base_config, data)

    @property
    def train(self) -> Split:
        return self.splits.train

    @property
    def validation(self) -> Split:
        return self.splits.validation

    @property
    def keras_objective(self) -> keras_tuner.Objective:
        return keras_tuner.Objective("val_accuracy" if self.objective == "val_accuracy" else "score", "max")

    def config_for(self, hp: keras_tuner.HyperParameters) -> TrainConfig:
        """The base config with ``hp``'s values."""
        values = {name: _hyperparameter(hp, name, spec) for name, spec in self.space.items()}
        return self.base_config.replace(**values).validate()

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.base_config, len(self.train.images))

    def build(self, hp):
        config = self.config_for(hp)
        model = build_jem(config, image_shape=self.data.image_shape, num_classes=self.data.num_classes,
                          train_data=self.splits.labelled, steps_per_epoch=self.steps_per_epoch(),
                          backbone=None if self.source is None else logits_network(self.source.network)[0])
        compile_jem(model, config, steps_per_epoch=self.steps_per_epoch())
        return model

    def load_checkpoint(self, model, filepath: str):
        (model if self.save_buffers else model.backbone).load_weights(filepath)
        return model

    def fit(self, hp, model, *args, callbacks=(), epochs=None, initial_epoch=0, **kwargs):
        config = self.config_for(hp)
        epochs = config.epochs if epochs is None else epochs
        own_callbacks = list(callbacks)
        # Silent inside trials: a failure is reported through the trial's status and message.
        guard = build_stability_guard(config, log=lambda message: None)
        if self.objective == "combined":
            own_callbacks.insert(0, _CombinedScore(self))
        train, validation, epoch_steps = build_datasets(config, self.splits, first_epoch=initial_epoch,
                                                        num_epochs=epochs)
        history = model.fit(train, validation_data=validation, epochs=epochs, initial_epoch=initial_epoch,
                            steps_per_epoch=epoch_steps, callbacks=[guard] + own_callbacks,
                            verbose=self.verbose, shuffle=False)
        if guard.failure is not None:
            raise keras_tuner.errors.FailedTrialError(guard.failure)
        results = {name: float(values[-1]) for name, values in history.history.items() if values}
        if not np.isfinite(results.get(self.keras_objective.name, np.nan)):
            raise keras_tuner.errors.FailedTrialError(f"non-finite objective: {results}")
        results["rollbacks"] = float(len(guard.rollbacks))
        return results


class _CombinedScore(keras.callbacks.Callback):
    """Adds ``val_ood_auroc`` and ``score = val_accuracy + val_ood_auroc`` to each epoch's logs."""

    def __init__(self, hypermodel: JEMHyperModel):
        super().__init__()
        self.hypermodel = hypermodel
        self._scorer = None  # one per trial's model, built at its first epoch

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or "val_accuracy" not in logs:
            return
        if self._scorer is None:
            self._scorer = OODScorer(self.model.backbone, value_range=self.model.value_range)
        auroc = ood_auroc(self.model, self.hypermodel.validation.images, seed=self.hypermodel.base_config.seed,
                          scorer=self._scorer)
        logs["val_ood_auroc"] = auroc
        logs["score"] = float(logs["val_accuracy"]) + auroc


def build_hypermodel(base_config: TrainConfig, data: ImageDataset, **kwargs) -> JEMHyperModel:
    """A :class:`JEMHyperModel` (see there for the arguments).

    Example:
        >>> hypermodel = build_hypermodel(load_recipe("digits"), load_dataset("digits"))
        >>> tuner = keras_tuner.RandomSearch(hypermodel, objective=hypermodel.keras_objective, max_trials=10)
    """
    return JEMHyperModel(base_config, data, **kwargs)


def _tuner_class(kind: str):
    base = {"random": keras_tuner.RandomSearch, "hyperband": keras_tuner.Hyperband,
            "bayesian": keras_tuner.BayesianOptimization, "grid": keras_tuner.GridSearch}[kind]

    class JEMTuner(base):
        stop_check: Optional[Callable[[], None]] = None

        def search(self, *fit_args, **fit_kwargs):
            """Runs the search on the data the hypermodel was built with (its run splits: train, validation):
            data given here would be silently ignored, so it is refused."""
            given = [f"{len(fit_args)} positional argument(s)"] if fit_args else []
            given += [name for name in ("x", "y", "validation_data", "validation_split", "sample_weight")
                      if name in fit_kwargs]
            if given:
                raise ValueError(f"{type(self).__name__}.search() trains every trial on the data of its hypermodel "
                                 f"(build_hypermodel(config, data)), so it takes no data; received {', '.join(given)}. "
                                 "Build the hypermodel with your dataset instead (jem_tf.data.ImageDataset).")
            return super().search(**fit_kwargs)

        def run_trial(self, trial, *fit_args, **fit_kwargs):
            """One trial with keras-tuner's public pieces only: the hypermodel builds the JEM (in the tuner's
            strategy), Hyperband's ``tuner/epochs`` and ``tuner/initial_epoch`` set the epochs and its
            ``tuner/trial_id`` names the earlier trial to continue from, and :class:`BestEpochCheckpoint` keeps the
            best epoch in the trial's directory (the backbone only unless the hypermodel saves buffers; keras-tuner's
            own checkpoint would store the whole model, replay buffer included)."""
            hp, hypermodel = trial.hyperparameters, self.hypermodel
            if "tuner/epochs" in hp.values:
                fit_kwargs.update(epochs=hp.values["tuner/epochs"], initial_epoch=hp.values["tuner/initial_epoch"])
            with keras_tuner.engine.tuner.maybe_distribute(self.distribution_strategy):
                model = hypermodel.build(hp)
                if hp.values.get("tuner/trial_id"):
                    hypermodel.load_checkpoint(model, self.best_epoch_file(hp.values["tuner/trial_id"]))
            checkpoint = BestEpochCheckpoint(self.best_epoch_file(trial.trial_id), hypermodel.keras_objective,
                                             hypermodel.save_buffers)
            fit_kwargs["callbacks"] = [*fit_kwargs.get("callbacks", []), checkpoint]
            try:
                return hypermodel.fit(hp, model, *fit_args, **fit_kwargs)
            except Exception:
                # keras-tuner records (and prints) any Exception as a failed trial and goes on: a stop request that
                # surfaced as one (a Ctrl-C swallowed while TensorFlow traced the step) must end the search instead.
                if self.stop_check is not None:
                    self.stop_check()
                raise

        def best_epoch_file(self, trial_id) -> str:
            """The weights of a trial's best epoch (see :meth:`run_trial`)."""
            return os.path.join(self.get_trial_dir(trial_id), "best_epoch.weights.h5")

        def load_model(self, trial):
            with keras_tuner.engine.tuner.maybe_distribute(self.distribution_strategy):
                model = self.hypermodel.build(trial.hyperparameters)
            return self.hypermodel.load_checkpoint(model, self.best_epoch_file(trial.trial_id))

    JEMTuner.__name__ = f"JEM{base.__name__}"
    return JEMTuner


def make_tuner(hypermodel: JEMHyperModel, *, kind: str = "random", max_trials: int = 10, directory: str,
               project_name: str = "jem", seed: int = 0, strategy=None, overwrite: bool = False,
               stop_check: Optional[Callable[[], None]] = None):
    """A keras-tuner tuner of ``kind`` (random, hyperband, bayesian, grid) that can resume a search
    in ``directory`` (``overwrite=False``) and reloads trial models from their (buffer-less) checkpoints.

    ``stop_check`` (e.g. a command's Ctrl-C flag) is called after every training batch and when a trial fails; it
    stops the search by raising (a ``BaseException`` such as ``KeyboardInterrupt``, which keras-tuner does not
    record as a failed trial)."""
    if kind not in TUNERS:
        raise ValueError(f"Unknown tuner {kind!r}; expected one of {TUNERS}.")
    if not (isinstance(max_trials, int) and max_trials >= 1):
        raise ValueError(f"`max_trials` must be an int >= 1; received {max_trials!r}")
    kwargs = dict(objective=hypermodel.keras_objective, directory=directory, project_name=project_name, seed=seed,
                  overwrite=overwrite, distribution_strategy=strategy, max_consecutive_failed_trials=max_trials)
    if kind == "hyperband":
        kwargs.update(max_epochs=hypermodel.base_config.epochs, factor=3)
    else:
        kwargs.update(max_trials=max_trials)
    tuner = _tuner_class(kind)(hypermodel, **kwargs)
    tuner.stop_check = stop_check
    return tuner


def summarize(tuner, hypermodel: JEMHyperModel, directory: str, *, wall_seconds: float) -> dict:
    """Writes ``summary.json`` (per-trial table, best hyperparameters) and ``best_recipe.json`` (the base
    recipe with the best values, for ``python -m jem_tf.train --recipe``); returns the summary."""
    objective = hypermodel.keras_objective.name
    trials = []
    for trial in tuner.oracle.trials.values():
        metrics = {name: trial.metrics.get_last_value(name) for name in trial.metrics.metrics}
        trials.append({"trial_id": trial.trial_id, "status": trial.status, "score": trial.score,
                       "hyperparameters": trial.hyperparameters.values, "metrics": metrics,
                       "message": getattr(trial, "message", None)})
    completed = [t for t in trials if t["status"] == "COMPLETED" and t["score"] is not None]
    best = max(completed, key=lambda t: t["score"]) if completed else None
    summary = {"objective": objective, "tuner": type(tuner).__name__, "wall_seconds": wall_seconds,
               "num_trials": len(trials), "num_failed": sum(t["status"] == "FAILED" for t in trials),
               "best": best, "search_space": hypermodel.space, "trials": trials}
    os.makedirs(directory, exist_ok=True)
    atomic_write_bytes(os.path.join(directory, "summary.json"),
                       json.dumps(summary, indent=2, default=str).encode("utf-8"))
    if best is not None:
        recipe = dataclasses.asdict(hypermodel.base_config)
        recipe.update(best["hyperparameters"])
        recipe["description"] = (f"Best of {len(trials)} {type(tuner).__name__} trials "
                                 f"({objective} = {best['score']:.4f}); base: {hypermodel.base_config.description}")
        atomic_write_json(os.path.join(directory, "best_recipe.json"), recipe)
    return summary


def run_search(base_config: TrainConfig, data: ImageDataset, *, directory: str, kind: str = "random",
               max_trials: int = 10, objective: str = "val_accuracy", space=None, save_buffers: bool = False,
               overwrite: bool = False, verbose=0, stop_check: Optional[Callable[[], None]] = None) -> dict:
    """Runs (or resumes) a search and writes its summary; see :func:`summarize` (``stop_check``: see
    :func:`make_tuner`)."""
    with as_usage_error():  # the machine does not offer what the config asks (TF_CONFIG, the CPU split)
        strategy = make_strategy(base_config.strategy, devices=base_config.devices,
                                 cpu_devices=base_config.cpu_devices)
    hypermodel = build_hypermodel(base_config, data, space=space, objective=objective, save_buffers=save_buffers,
                                  verbose=verbose)
    tuner = make_tuner(hypermodel, kind=kind, max_trials=max_trials, directory=directory, seed=base_config.seed,
                       strategy=None if base_config.strategy == "default" else strategy, overwrite=overwrite,
                       stop_check=stop_check)
    callbacks = [] if stop_check is None else [
        keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: stop_check())]
    start = time.time()
    tuner.search(callbacks=callbacks)
    return summarize(tuner, hypermodel, directory, wall_seconds=time.time() - start)
