"""``train_and_evaluate(config, workdir)``: the whole training pipeline, importable and testable.

It loads the run's data and derives its splits once (:func:`jem_tf.run.splits.run_splits`), builds what the config
describes (:mod:`jem_tf.training.factories`), trains with resumption, checkpoints and the stability guard, evaluates on
the test split and writes the work directory (:class:`jem_tf.run.workdir.RunLayout`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Optional, Tuple

import keras
import numpy as np

from jem_tf import metrics as metrics_lib
from jem_tf.data import ImageDataset, preprocessing_of
from jem_tf.errors import as_usage_error
from jem_tf.evaluation.refinement_choice import choose_refinement
from jem_tf.files import atomic_write_json, file_sha256, remove_path
from jem_tf.model import energy as energy_lib
from jem_tf.model.heads import with_temperature
from jem_tf.model.views import jem_with_views
from jem_tf.ood import fit_ood_detector
from jem_tf.run.config import TrainConfig
from jem_tf.run.config_rules import check_steps_per_execution
from jem_tf.run.model_files import (
    ClassifierSource,
    calibrates_source,
    classifier_file,
    load_classifier,
    source_classifier_network,
    with_energy_l2_center,
    with_validation_temperature,
)
from jem_tf.run.splits import RunSplits, load_run_dataset, run_splits
from jem_tf.run.workdir import RunLayout, clear_run, prepare_workdir, save_model_atomically
from jem_tf.run.workdir_lock import WorkdirLock
from jem_tf.sampling.distribution import is_chief, make_strategy
from jem_tf.serving import export_saved_model, serving_model
from jem_tf.training.callbacks import ChiefBackupAndRestore, RotatingCheckpoint, SampleGridCallback
from jem_tf.training.factories import (
    build_datasets,
    build_jem,
    build_stability_guard,
    compile_jem,
    resolve_config_precision,
)
from jem_tf.training.factories import steps_per_epoch as count_steps_per_epoch


def resolve_run_precision(config: TrainConfig, layout: RunLayout, *, image_shape, num_classes: int, batch_size: int,
                          log=print, write: bool = True, backbone=None, resume: Optional[bool] = None
                          ) -> Tuple[TrainConfig, dict]:
    """:func:`~jem_tf.training.factories.resolve_config_precision` once per run: ``precision="auto"`` is probed when
    the run starts and the choice recorded in ``layout.precision``; a run that resumes from a backup reuses
    it (a second probe, on a busy machine, could choose the other precision and break exact resumption).
    ``resume``: whether the run resumes (default: whether ``layout`` holds a backup); ``write=False`` records
    nothing (call :func:`write_run_precision` once writing is allowed)."""
    resume = os.path.isdir(layout.backup) if resume is None else resume
    if config.precision == "auto" and resume and os.path.isfile(layout.precision):
        with open(layout.precision) as f:
            report = json.load(f)
        if report.get("precision") in ("float32", "mixed_bfloat16"):
            report["reason"] = f"{report.get('reason', '')} (probed when the run started; reused on resume)"
            if log:
                log(f"precision auto -> {report['precision']}: the choice of the run being resumed")
            return config.replace(precision=report["precision"]), report
    run_config, report = resolve_config_precision(config, image_shape=image_shape, num_classes=num_classes, log=log,
                                                  batch_size=batch_size, backbone=backbone)
    if write:
        write_run_precision(config, layout, report)
    return run_config, report


def write_run_precision(config: TrainConfig, layout: RunLayout, report: dict) -> None:
    """Records the choice of ``precision="auto"`` in ``layout.precision`` (not a choice reused on resume)."""
    if config.precision == "auto" and "reused on resume" not in report.get("reason", ""):
        os.makedirs(layout.workdir, exist_ok=True)
        atomic_write_json(layout.precision, report)


def train_and_evaluate(config: TrainConfig, workdir: str, *, verbose="auto",
                       data: ImageDataset | None = None, callbacks=(), overwrite: bool = False) -> dict:
    """Trains a JEM as ``config`` says, evaluates it on the test split and writes ``workdir``:

    * ``model.keras``: the final model (weights, optimizer, replay buffer);
    * ``checkpoints/epoch_NNNN.keras``: the last ``checkpoints_to_keep`` epochs;
    * ``logs/``: TensorBoard scalars and replay-buffer sample grids;
    * ``samples.png``: a grid of replay-buffer samples at the end;
    * ``metrics.json``: test accuracy and the other final metrics; ``config.json``: the config;
    * ``config.export_dir/<version>/``: a SavedModel for TensorFlow Serving, if ``export_dir`` is set;
    * ``backup/``: the training state at the last finished epoch while training runs (deleted at the
      end); rerunning the same command after a crash resumes from it.

    Under ``multi_worker`` every worker runs this function with the same ``workdir`` (a directory
    they share); only the chief writes files. ``config.batch_size`` is the global batch.

    Args:
        config: The run's settings (validated here).
        workdir: Output directory (created).
        verbose: Keras ``fit`` verbosity.
        data: Optional already-loaded dataset (else :func:`jem_tf.run.splits.load_run_dataset`).
        callbacks: Extra Keras callbacks for ``fit`` (after the pipeline's own; e.g. a time budget).
        overwrite: Replace a finished run (or an interrupted one) in ``workdir``; without it a finished
            run is an error and an interrupted one is resumed (see :func:`jem_tf.run.workdir.prepare_workdir`).

    Returns:
        The metrics written to ``metrics.json``.
    """
    config.validate()
    if config.init_from is not None and config.init_from_sha256 is None:
        # The source's hash is one of the run's settings: config.json records it and a resume must match it.
        config = config.replace(init_from_sha256=file_sha256(classifier_file(config.init_from)))
    # First: splitting the CPU into logical devices must happen before TensorFlow initialises.
    with as_usage_error():  # the machine does not offer what the config asks (TF_CONFIG, the CPU split)
        strategy = make_strategy(config.strategy, devices=config.devices, cpu_devices=config.cpu_devices)
    chief = is_chief(strategy)
    keras.utils.set_random_seed(config.seed)
    layout = RunLayout(workdir)
    state = "empty"
    if chief:  # before anything is loaded or written: a live run in it, a finished run, a mismatched resume, bad paths
        WorkdirLock(layout).check()
        state = prepare_workdir(layout, config, overwrite=overwrite)
    resume = state == "interrupted" and not overwrite
    # Everything is checked and built before the work directory is written (the lock, config.json, precision.json):
    # a bad invocation never touches a run's files.
    if data is None:
        data = load_run_dataset(config=config, download=config.download)
    splits = run_splits(config, data)
    steps_per_epoch = count_steps_per_epoch(config, len(splits.train.images))
    check_steps_per_execution(config, steps_per_epoch)
    # Conversion: the classifier is read and checked against the data.
    source = None if config.init_from is None else load_classifier(
        config.init_from, image_shape=data.image_shape, num_classes=data.num_classes, sha256=config.init_from_sha256,
        images=splits.train.images)
    source = with_validation_temperature(config, source, splits.validation)
    if chief and calibrates_source(config):
        print(f"Temperature: {source.temperature:.4g} (the classifier's logits divided by it; fitted on the "
              "validation split).")
    if config.energy_l2_weight > 0:
        config = with_energy_l2_center(config, source, splits.train.images)  # recorded in config.json
        if chief and source is not None:
            print(f"Energy L2 centre: {config.energy_l2_center:.4g} (the classifier's mean training energy).")
    # The precision probe times a single-device copy of the network at the per-replica batch: outside the
    # strategy's scope (its variables would be distributed).
    run_config, precision_report = resolve_run_precision(
        config, layout, image_shape=data.image_shape, num_classes=data.num_classes, log=print if chief else None,
        batch_size=max(1, config.batch_size // strategy.num_replicas_in_sync), write=False, resume=resume,
        backbone=None if source is None else source.network)
    with strategy.scope():
        model = build_jem(run_config, image_shape=data.image_shape, num_classes=data.num_classes,
                          train_data=splits.labelled, steps_per_epoch=steps_per_epoch,
                          backbone=None if source is None else source.network)
        compile_jem(model, run_config, steps_per_epoch=steps_per_epoch)
    # One training per work directory (the chief's lock); only now is anything written.
    with WorkdirLock(layout) if chief else contextlib.nullcontext():
        if chief:
            state = prepare_workdir(layout, config, overwrite=overwrite, log=None)  # again, under the lock
            for path in layout.temporaries():  # of a killed process (only the lock's holder writes here)
                remove_path(path)
            if overwrite and state != "empty":
                clear_run(layout)
            atomic_write_json(layout.config, config.to_dict())
            write_run_precision(config, layout, precision_report)
        return _train(config, model, layout, splits, strategy=strategy, chief=chief, verbose=verbose,
                      callbacks=callbacks, source=source, precision_report=precision_report,
                      compile_model=lambda jem: compile_jem(jem, run_config, steps_per_epoch=steps_per_epoch))


def _stage_timer(seconds: dict):
    """A context manager factory: ``with stage(name):`` adds the block's wall seconds to ``seconds[name]``."""
    @contextlib.contextmanager
    def stage(name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return stage


def _train(config: TrainConfig, model, layout: RunLayout, splits: RunSplits, *, strategy, chief: bool, verbose,
           callbacks, source: Optional[ClassifierSource], precision_report: dict, compile_model) -> dict:
    """The locked part of :func:`train_and_evaluate`: resume, fit, save, evaluate, export (``compile_model(jem)``
    compiles a JEM as the run does)."""
    # Resume: restore the newest readable backup (weights, optimizer, buffer, seed state) first, so that
    # the data pipeline can start at the right epoch.
    backup = ChiefBackupAndRestore(layout.backup, is_chief=chief, delete_on_completion=False)
    initial_epoch = backup.restore(model)
    train_ds, val_ds, epoch_steps = build_datasets(config, splits, first_epoch=initial_epoch)
    validation = splits.validation

    log_dir = layout.logs
    extra_callbacks, callbacks = list(callbacks), [backup]
    guard = None
    if config.stability_guard:
        guard = build_stability_guard(config, log_dir=log_dir if chief else None)
        callbacks.insert(0, guard)  # before the backup, so that a rolled-back epoch is what gets saved
    if chief:
        callbacks += [
            keras.callbacks.TensorBoard(log_dir=log_dir, update_freq="epoch"),
            RotatingCheckpoint(layout.checkpoints, keep=config.checkpoints_to_keep),
            SampleGridCallback(log_dir=log_dir, png_path=layout.samples,
                               num_images=config.num_sample_images, every_epochs=config.sample_every_epochs,
                               seed=config.seed),
        ]
    callbacks += extra_callbacks
    start, start_step = time.time(), int(model.optimizer.iterations.numpy())
    # The dataset shuffles itself (seeded); Keras's own shuffle does not apply to datasets.
    history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                        steps_per_epoch=epoch_steps, callbacks=callbacks, verbose=verbose, shuffle=False)
    train_seconds = time.time() - start
    steps = int(model.optimizer.iterations.numpy())
    if guard is not None:
        guard.raise_if_failed()  # the backup of the last good epoch stays in WORKDIR/backup
    # What the run does after training, each stage timed (metrics.json: end_of_training_seconds).
    stage_seconds = {}
    stage = _stage_timer(stage_seconds)
    if config.test_time_augmentation != "none":
        # From here on the model is the view-averaged network: refinement, evaluation, model.keras and the export.
        with stage("test_time_augmentation"), strategy.scope():
            model = compile_model(jem_with_views(model, config.test_time_augmentation))
            model.optimizer.build(model.trainable_variables)  # saved built (its state is not the training's)
    temperature = source.temperature if calibrates_source(config) else None
    if config.temperature_scaling and not calibrates_source(config):
        # Calibrated on the validation split, folded into the trained model's linear head (the predictions unchanged).
        with stage("temperature_scaling"):
            temperature = metrics_lib.fit_temperature(model.predict(validation.images, batch_size=256, verbose=0),
                                                      validation.labels)
            with_temperature(model.backbone, temperature, in_place=True)
    refinement = None
    if config.choose_refinement and validation is not None and len(validation.images) > 0:
        # Test-time refinement settings for this model, chosen on the run's validation split and saved with it.
        with stage("refinement_choice"):
            refinement = choose_refinement(model, validation.images, validation.labels, seed=config.seed)
        model.refinement = refinement.settings
    if chief:
        with stage("save_model"):
            save_model_atomically(model, layout.model)  # the backup stays until the run is complete

    # Every worker predicts (a collective under multi_worker); only the chief writes. One pass over the test split:
    # accuracy, NLL, ECE and the mean energy all come from its logits.
    with stage("test_evaluation"):
        test_logits = model.predict(splits.test.images, batch_size=256, verbose=0)
        test = metrics_lib.calibration_metrics(test_logits, splits.test.labels, num_bins=20)
    metrics = {
        "dataset": config.dataset,
        "class_names": None if splits.class_names is None else list(splits.class_names),
        "init_from": None if source is None else source.record(),
        "test_accuracy": test["accuracy"],
        "test_nll": test["nll"],
        "test_ece": test["ece"],
        "test_energy_mean": float(np.mean(energy_lib.energy(test_logits))),
        "num_train": int(len(splits.train.images)),
        "labels_per_class": config.labels_per_class,
        "num_labelled": int(len(splits.labelled.images)),
        "num_test": int(len(splits.test.images)),
        "epochs": config.epochs,
        "strategy": config.strategy,
        "precision": precision_report,
        "num_replicas": int(strategy.num_replicas_in_sync),
        "steps": steps,
        "train_seconds": train_seconds,
        # Of the steps this process ran (a resumed run ran fewer than `steps`).
        "seconds_per_step": train_seconds / max(1, steps - start_step),
        "resumed_from_epoch": initial_epoch,
        "rollbacks": guard.rollbacks if guard is not None else [],
        "final_train": {k: float(np.ravel(v[-1])[0]) for k, v in history.history.items()
                        if v and not k.startswith("val_")},
        "final_validation": {k[4:]: float(np.ravel(v[-1])[0]) for k, v in history.history.items()
                             if v and k.startswith("val_")},
    }
    if temperature is not None:
        metrics["temperature"] = {"value": temperature, "fitted_to": "the source classifier, before training"
                                  if calibrates_source(config) else "the trained model"}
    if refinement is not None:
        metrics["refinement"] = {"settings": refinement.settings.describe(), "validation_plain": refinement.plain,
                                 "candidates": refinement.candidates}
    if model.samples_contrastive:
        # Mean energy of the replay buffer's chains vs. the test data: close when p(x) is fitted.
        with stage("buffer_energy"):
            chains = model.replay_buffer.chains().numpy()
            chain_logits = model.predict(chains, batch_size=1024, verbose=0)
        metrics["buffer_energy_mean"] = float(np.mean(energy_lib.energy(chain_logits)))
    metrics["end_of_training_seconds"] = stage_seconds  # the export's stage is added below
    if chief and config.export_dir:
        # The OOD detector: chosen and calibrated on the validation split (config.validate requires one), with
        # the feature statistics of the training images whose labels the run used.
        with stage("export"):
            # Calibrated on the scores the export serves; the export itself gets the trained model (its metadata
            # records the training precision).
            # A conversion's detector may also be its classifier's own, computed by the classifier as it was.
            source_network = source_classifier_network(config, image_shape=model.image_shape,
                                                       num_classes=model.num_classes)
            ood = fit_ood_detector(serving_model(model, config.serving_precision), validation.images,
                                   calibration_split="validation",
                                   calibration_labels=validation.labels, train_images=splits.labelled.images,
                                   train_labels=splits.labelled.labels, seed=config.seed,
                                   source_network=source_network)
            metrics["export_path"] = export_saved_model(
                model, config.export_dir, ood=ood,
                preprocessing=splits.preprocessing or preprocessing_of(config.dataset), dataset=config.dataset,
                class_names=splits.class_names, serving_precision=config.serving_precision)
            metrics["ood_detector"] = {"score": ood.detector.name, "threshold": ood.detector.threshold,
                                       "calibration_split": "validation"}
    stage_seconds["total"] = sum(stage_seconds.values())
    stage_seconds["fraction_of_training"] = stage_seconds["total"] / max(train_seconds, 1e-9)
    if chief:
        atomic_write_json(layout.metrics, metrics)
    if backup.completed:
        backup.remove()  # only now: a kill before this point resumes from it
    return metrics
