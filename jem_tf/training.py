"""``train_and_evaluate(config, workdir)``: the whole training pipeline, importable and testable."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional, Tuple

import keras
import numpy as np

from jem_tf import energy as energy_lib
from jem_tf.chain_init import ClassGaussian
from jem_tf.callbacks import ChiefBackupAndRestore, RotatingCheckpoint, SampleGridCallback
from jem_tf.config import TrainConfig
from jem_tf.data import (PREPROCESSING, ImageDataset, load_dataset, make_dataset, make_epochs_dataset,
                         split_validation)
from jem_tf.distribution import is_chief, make_strategy
from jem_tf.export import export_saved_model
from jem_tf.jem import JEM
from jem_tf.networks import build_backbone, with_precision
from jem_tf.precision import resolve_precision
from jem_tf.runs import CONFIG_FILE, METRICS_FILE, MODEL_FILE, SAMPLES_FILE
from jem_tf.schedules import WarmupPiecewiseSchedule
from jem_tf.sgld import SGLDSampler
from jem_tf.stability import StabilityGuard


def build_float32_backbone(config: TrainConfig, *, image_shape, num_classes: int) -> keras.Model:
    """The config's backbone in float32 (before :func:`~jem_tf.networks.with_precision`)."""
    backbone_kwargs = dict(num_classes=num_classes, input_shape=tuple(image_shape), dropout=config.dropout,
                           seed=config.seed)
    if config.backbone == "small_cnn":
        backbone_kwargs["width"] = config.width
    else:
        backbone_kwargs["normalization"] = config.normalization
    return build_backbone(config.backbone, **backbone_kwargs)


def build_jem(config: TrainConfig, *, image_shape, num_classes: int,
              train_data: Optional[Tuple[np.ndarray, np.ndarray]] = None,
              steps_per_epoch: Optional[int] = None) -> JEM:
    """Builds the backbone and the (uncompiled) JEM a config describes.

    ``train_data`` ``(images, labels)``: the training split, needed for ``chain_init="class_gaussian"``
    (the class Gaussians are fitted to it). ``steps_per_epoch``: needed for ``classifier_epochs > 0``.
    ``config.precision`` must be resolved (not ``"auto"``; see :func:`resolve_config_precision`).
    """
    if config.precision == "auto":
        raise ValueError("build_jem needs a resolved precision; call resolve_config_precision first.")
    if config.classifier_epochs and steps_per_epoch is None:
        raise ValueError("classifier_epochs > 0 needs `steps_per_epoch`.")
    chain_init = None
    if config.chain_init == "class_gaussian":
        if train_data is None:
            raise ValueError("chain_init 'class_gaussian' needs the training data (`train_data=(images, labels)`).")
        chain_init = ClassGaussian.fit(*train_data, num_classes=num_classes, rank=config.chain_init_rank)
    backbone = with_precision(build_float32_backbone(config, image_shape=image_shape, num_classes=num_classes),
                              config.precision)
    sampler = SGLDSampler(
        step_size=config.sgld_step_size,
        noise_std=config.sgld_noise_std,
        n_steps=config.sgld_steps,
        grad_clip=config.sgld_grad_clip,
        grad_clamp=config.sgld_grad_clamp,
        clamp_range=(-1.0, 1.0) if config.sgld_clamp else None,
        jit_compile=config.sgld_jit_compile,
    )
    return JEM(
        backbone,
        sampler=sampler,
        buffer_size=config.buffer_size,
        buffer_storage=config.buffer_storage,
        restart_prob=config.restart_prob,
        pyx_weight=config.pyx_weight,
        px_weight=config.px_weight,
        pxy_weight=config.pxy_weight,
        energy_l2_weight=config.energy_l2_weight,
        data_noise_std=config.data_noise_std,
        seed=config.seed,
        chain_init=chain_init,
        energy_start_step=config.classifier_epochs * steps_per_epoch if config.classifier_epochs else 0,
        name="jem",
    )


def resolve_config_precision(config: TrainConfig, *, image_shape, num_classes: int, log=print,
                             batch_size: Optional[int] = None) -> Tuple[TrainConfig, dict]:
    """``(config with a concrete precision, report)``: ``precision="auto"`` is decided by a measured probe
    of the config's backbone at ``batch_size`` (default: the config's; see
    :func:`jem_tf.precision.resolve_precision`). Call it outside a ``tf.distribute`` strategy's scope."""
    if config.precision != "auto":
        return config, {"precision": config.precision, "reason": "set explicitly"}
    backbone = build_float32_backbone(config, image_shape=image_shape, num_classes=num_classes)
    precision, report = resolve_precision("auto", backbone=backbone, batch_size=batch_size or config.batch_size,
                                          log=log)
    return config.replace(precision=precision), report


def build_stability_guard(config: TrainConfig, **kwargs) -> StabilityGuard:
    """The :class:`StabilityGuard` with the config's bounds and rollback settings (``kwargs``: ``log``,
    ``log_dir``)."""
    return StabilityGuard(max_abs_energy=config.max_abs_energy, max_energy_gap=config.max_energy_gap,
                          max_rollbacks=config.max_rollbacks, lr_factor=config.rollback_lr_factor,
                          extra_sgld_steps=config.rollback_extra_sgld_steps,
                          reset_buffer=config.rollback_reset_buffer, **kwargs)


def build_optimizer(config: TrainConfig, *, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam (or SGD with momentum 0.9) with linear warm-up and step decay at ``decay_epochs``; wrapped in
    a ``LossScaleOptimizer`` for ``mixed_float16``."""
    schedule = WarmupPiecewiseSchedule(
        config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_boundaries=[e * steps_per_epoch for e in config.decay_epochs],
        decay_rate=config.decay_rate,
    )
    weight_decay = config.weight_decay or None
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=weight_decay)
    else:
        optimizer = keras.optimizers.Adam(schedule, beta_1=0.9, beta_2=0.999, weight_decay=weight_decay)
    if config.precision == "mixed_float16":
        # float16 gradients underflow without loss scaling (bfloat16 has float32's exponent range).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def check_steps_per_execution(config: TrainConfig, steps_per_epoch: int) -> None:
    """``steps_per_execution`` must divide the steps per epoch: a partial last execution would run into
    the next epoch's batches (and break exact resumption)."""
    if steps_per_epoch % config.steps_per_execution:
        divisors = [str(d) for d in range(1, min(steps_per_epoch, 64) + 1) if steps_per_epoch % d == 0]
        raise ValueError(f"steps_per_execution ({config.steps_per_execution}) must divide the {steps_per_epoch} "
                         f"training steps per epoch (e.g. {', '.join(divisors)}).")


def compile_jem(model: JEM, config: TrainConfig, *, steps_per_epoch: int) -> JEM:
    """Compiles ``model`` with :func:`build_optimizer` and the config's ``steps_per_execution``."""
    check_steps_per_execution(config, steps_per_epoch)
    model.compile(optimizer=build_optimizer(config, steps_per_epoch=steps_per_epoch),
                  steps_per_execution=config.steps_per_execution)
    return model


def _prepare_splits(config: TrainConfig, data: ImageDataset):
    x_train, y_train = data.x_train, data.y_train
    validation = None
    if config.validation_fraction > 0:
        (x_train, y_train), validation = split_validation(
            x_train, y_train, fraction=config.validation_fraction, seed=config.seed)
    return (x_train, y_train), validation


def train_and_evaluate(config: TrainConfig, workdir: str, *, verbose="auto",
                       data: Optional[ImageDataset] = None, callbacks=()) -> dict:
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
        data: Optional already-loaded dataset (else ``load_dataset(config.dataset, ...)``).
        callbacks: Extra Keras callbacks for ``fit`` (after the pipeline's own; e.g. a time budget).

    Returns:
        The metrics written to ``metrics.json``.
    """
    config.validate()
    # First: splitting the CPU into logical devices must happen before TensorFlow initialises.
    strategy = make_strategy(config.strategy, devices=config.devices, cpu_devices=config.cpu_devices)
    chief = is_chief(strategy)
    keras.utils.set_random_seed(config.seed)
    if data is None:
        data = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download, seed=config.seed)
    (x_train, y_train), validation = _prepare_splits(config, data)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    check_steps_per_execution(config, steps_per_epoch)
    # Written once the inputs are known to be good, so a bad invocation never touches a run's files.
    if chief:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    val_ds = None
    if validation is not None:
        val_ds = make_dataset(*validation, batch_size=max(config.batch_size, 256), shuffle=False)

    # The precision probe times a single-device copy of the network at the per-replica batch: outside the
    # strategy's scope (its variables would be distributed).
    run_config, precision_report = resolve_config_precision(
        config, image_shape=data.image_shape, num_classes=data.num_classes, log=print if chief else None,
        batch_size=max(1, config.batch_size // strategy.num_replicas_in_sync))
    with strategy.scope():
        model = build_jem(run_config, image_shape=data.image_shape, num_classes=data.num_classes,
                          train_data=(x_train, y_train), steps_per_epoch=steps_per_epoch)
        compile_jem(model, run_config, steps_per_epoch=steps_per_epoch)

    # Resume: restore the newest readable backup (weights, optimizer, buffer, seed state) first, so that
    # the data pipeline can start at the right epoch.
    backup = ChiefBackupAndRestore(os.path.join(workdir, "backup"), is_chief=chief)
    initial_epoch = backup.restore(model)
    if config.strategy == "multi_worker":
        # Element-sharded across workers; on resume the model state is exact but the data order of the
        # remaining epochs differs from an uninterrupted run.
        train_ds = make_dataset(x_train, y_train, batch_size=config.batch_size, shuffle=True, seed=config.seed,
                                augment=config.augment)
        epoch_steps = None
    else:
        train_ds = make_epochs_dataset(x_train, y_train, batch_size=config.batch_size, seed=config.seed,
                                       first_epoch=initial_epoch, num_epochs=config.epochs, augment=config.augment)
        epoch_steps = steps_per_epoch

    log_dir = os.path.join(workdir, "logs")
    extra_callbacks, callbacks = list(callbacks), [backup]
    guard = None
    if config.stability_guard:
        guard = build_stability_guard(config, log_dir=log_dir if chief else None)
        callbacks.insert(0, guard)  # before the backup, so that a rolled-back epoch is what gets saved
    if chief:
        callbacks += [
            keras.callbacks.TensorBoard(log_dir=log_dir, update_freq="epoch"),
            RotatingCheckpoint(os.path.join(workdir, "checkpoints"), keep=config.checkpoints_to_keep),
            SampleGridCallback(log_dir=log_dir, png_path=os.path.join(workdir, SAMPLES_FILE),
                               num_images=config.num_sample_images, every_epochs=config.sample_every_epochs,
                               seed=config.seed),
        ]
    callbacks += extra_callbacks
    start, start_step = time.time(), int(model.optimizer.iterations.numpy())
    # The dataset shuffles itself (seeded); Keras's own shuffle does not apply to datasets.
    history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                        steps_per_epoch=epoch_steps, callbacks=callbacks, verbose=verbose, shuffle=False)
    train_seconds = time.time() - start
    if guard is not None:
        guard.raise_if_failed()  # the backup of the last good epoch stays in WORKDIR/backup
    if chief:
        model.save(os.path.join(workdir, MODEL_FILE))

    # Every worker evaluates (evaluation is a collective under multi_worker); only the chief writes.
    test = model.evaluate(make_dataset(data.x_test, data.y_test, batch_size=256, shuffle=False),
                          return_dict=True, verbose=0)
    metrics = {
        "dataset": config.dataset,
        "test_accuracy": float(test["accuracy"]),
        "test_nll": float(test["ce"]),
        "test_energy_mean": float(test["e_data"]),
        "num_train": int(len(x_train)),
        "num_test": int(len(data.x_test)),
        "epochs": config.epochs,
        "strategy": config.strategy,
        "precision": precision_report,
        "num_replicas": int(strategy.num_replicas_in_sync),
        "steps": int(model.optimizer.iterations.numpy()),
        "train_seconds": train_seconds,
        # Of the steps this process ran (a resumed run ran fewer than `steps`).
        "seconds_per_step": train_seconds / max(1, int(model.optimizer.iterations.numpy()) - start_step),
        "resumed_from_epoch": initial_epoch,
        "rollbacks": guard.rollbacks if guard is not None else [],
        "final_train": {k: float(np.ravel(v[-1])[0]) for k, v in history.history.items()
                        if v and not k.startswith("val_")},
        "final_validation": {k[4:]: float(np.ravel(v[-1])[0]) for k, v in history.history.items()
                             if v and k.startswith("val_")},
    }
    if model.samples_contrastive:
        # Mean energy of the replay buffer's chains vs. the test data: close when p(x) is fitted.
        chains = model.replay_buffer.chains().numpy()
        chain_logits = model.predict(chains, batch_size=1024, verbose=0)
        metrics["buffer_energy_mean"] = float(np.mean(energy_lib.energy(chain_logits)))
    if chief and config.export_dir:
        # Calibrate the OOD threshold on held-out in-distribution data: the validation split.
        calibration = validation[0] if validation is not None else data.x_test
        metrics["export_path"] = export_saved_model(
            model, config.export_dir, calibration_images=calibration,
            preprocessing=PREPROCESSING.get(config.dataset, ""), dataset=config.dataset)
    if chief:
        with open(os.path.join(workdir, METRICS_FILE), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics
