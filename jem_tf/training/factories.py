"""Everything a :class:`~jem_tf.run.config.TrainConfig` builds, used by training, tuning and the benchmarks:
the backbone, the JEM, its optimizer, the compiled model, the stability guard and the input pipelines.

The pipeline that runs them (:func:`jem_tf.training.pipeline.train_and_evaluate`) and the search
(:mod:`jem_tf.training.tuning`) call these and build nothing themselves.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from jem_tf.data import make_dataset, make_epochs_dataset, make_semi_supervised_dataset
from jem_tf.errors import UsageError
from jem_tf.model.heads import with_density_head
from jem_tf.model.jem import JEM
from jem_tf.networks import build_backbone, freeze_batch_norm, freeze_layers, whiten_stem, with_precision
from jem_tf.run.config import TrainConfig
from jem_tf.run.config_rules import check_steps_per_execution
from jem_tf.run.splits import RunSplits
from jem_tf.sampling.chain_init import ClassGaussian
from jem_tf.sampling.sgld import SGLDSampler
from jem_tf.training.precision import resolve_precision
from jem_tf.training.schedules import WarmupPiecewiseSchedule
from jem_tf.training.stability import StabilityGuard


def build_float32_backbone(config: TrainConfig, *, image_shape, num_classes: int) -> keras.Model:
    """The config's backbone in float32 (before :func:`~jem_tf.networks.with_precision`)."""
    backbone_kwargs = dict(num_classes=num_classes, input_shape=tuple(image_shape), dropout=config.dropout,
                           seed=config.seed)
    if config.backbone in ("small_cnn", "fast_cnn"):
        backbone_kwargs["width"] = config.width
    if config.backbone != "small_cnn":
        backbone_kwargs["normalization"] = config.normalization
    return build_backbone(config.backbone, **backbone_kwargs)


def _require_train_data(train_data, setting: str) -> None:
    if train_data is None:
        raise ValueError(f"{setting} needs the training data (`train_data=(images, labels)`).")


def build_jem(config: TrainConfig, *, image_shape, num_classes: int,
              train_data: Optional[Tuple[np.ndarray, np.ndarray]] = None,
              steps_per_epoch: Optional[int] = None, backbone: Optional[keras.Model] = None) -> JEM:
    """Builds the backbone and the (uncompiled) JEM a config describes.

    ``backbone``: a float32 logits network to start from instead of the config's (a converted classifier,
    :func:`jem_tf.run.model_files.load_classifier`), trained as the JEM's network (a 16-bit precision trains a copy).

    ``train_data`` ``(images, labels)``: the labelled training images (:attr:`jem_tf.run.splits.RunSplits.labelled`),
    needed for ``chain_init="class_gaussian"`` (the class Gaussians are fitted to them) and
    ``stem_init="whitened"``. ``steps_per_epoch``: needed for ``classifier_epochs > 0``.
    ``config.precision`` must be resolved (not ``"auto"``; see :func:`resolve_config_precision`).
    """
    if config.precision == "auto":
        raise ValueError("build_jem needs a resolved precision; call resolve_config_precision first.")
    if config.classifier_epochs and steps_per_epoch is None:
        raise ValueError("classifier_epochs > 0 needs `steps_per_epoch`.")
    whiten = backbone is None and config.stem_init == "whitened"  # a given backbone keeps its own weights
    if whiten:
        _require_train_data(train_data, "stem_init 'whitened'")
    chain_init = None
    if config.chain_init == "class_gaussian":
        _require_train_data(train_data, "chain_init 'class_gaussian'")
        # A class of the run's data with fewer than 2 images is a UsageError; any other error is a fault.
        chain_init = ClassGaussian.fit(*train_data, num_classes=num_classes, rank=config.chain_init_rank)
    if backbone is None:
        backbone = build_float32_backbone(config, image_shape=image_shape, num_classes=num_classes)
        if whiten:
            whiten_stem(backbone, train_data[0])
    elif config.density_head:
        try:
            backbone = with_density_head(backbone, units=config.density_head, seed=config.seed,
                                         train_classifier=config.density_head_finetune,
                                         layers=config.density_head_layers, offset=config.density_head_offset,
                                         temperature=config.density_temperature)
        except ValueError as error:  # no linear head to extend, or no layer of a name in density_head_layers
            layers = f" with density_head_layers {config.density_head_layers}" if config.density_head_layers else ""
            raise UsageError(f"density_head {config.density_head}{layers}: {error}") from error
    if config.freeze_batch_norm:
        freeze_batch_norm(backbone)
    if config.frozen_layers:
        freeze_layers(backbone, config.frozen_layers)
    backbone = with_precision(backbone, config.precision)
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
        energy_l2_center=0.0 if config.energy_l2_center is None else config.energy_l2_center,
        energy_l2_samples=config.energy_l2_samples,
        label_smoothing=config.label_smoothing,
        data_noise_std=config.data_noise_std,
        seed=config.seed,
        chain_init=chain_init,
        chain_init_uniform_fraction=config.chain_init_uniform_fraction,
        chain_init_flat_fraction=config.chain_init_flat_fraction,
        energy_start_step=config.classifier_epochs * steps_per_epoch if config.classifier_epochs else 0,
        name="jem",
    )


def resolve_config_precision(config: TrainConfig, *, image_shape, num_classes: int, log=print,
                             batch_size: Optional[int] = None, backbone: Optional[keras.Model] = None
                             ) -> Tuple[TrainConfig, dict]:
    """``(config with a concrete precision, report)``: ``precision="auto"`` is decided by a measured probe
    of the config's backbone (or the float32 ``backbone`` given) at ``batch_size`` (default: the config's; see
    :func:`jem_tf.training.precision.resolve_precision`). Call it outside a ``tf.distribute`` strategy's scope."""
    if config.precision != "auto":
        return config, {"precision": config.precision, "reason": "set explicitly"}
    if backbone is None:
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


def compile_jem(model: JEM, config: TrainConfig, *, steps_per_epoch: int) -> JEM:
    """Compiles ``model`` with :func:`build_optimizer`, the config's ``steps_per_execution`` and its
    ``jit_compile`` (XLA for the whole step; off unless asked for, on every device)."""
    check_steps_per_execution(config, steps_per_epoch)
    model.compile(optimizer=build_optimizer(config, steps_per_epoch=steps_per_epoch),
                  steps_per_execution=config.steps_per_execution, jit_compile=config.jit_compile)
    return model


def steps_per_epoch(config: TrainConfig, num_train: int) -> int:
    """Training steps per epoch: ``ceil(num_train / batch_size)`` (the last batch may be smaller)."""
    return math.ceil(num_train / config.batch_size)


def build_datasets(config: TrainConfig, splits: RunSplits, *, first_epoch: int = 0, num_epochs: Optional[int] = None
                   ) -> Tuple[tf.data.Dataset, Optional[tf.data.Dataset], Optional[int]]:
    """``(train_ds, validation_ds, epoch_steps)`` of a run's ``splits`` (:func:`jem_tf.run.splits.run_splits`) for
    ``model.fit(train_ds, validation_data=validation_ds, steps_per_epoch=epoch_steps, initial_epoch=first_epoch,
    epochs=num_epochs)``.

    The training batches of epochs ``first_epoch .. num_epochs - 1`` are seeded per epoch, so a resumed
    run sees the batches an uninterrupted one would. Under ``multi_worker`` the dataset is one shuffled
    stream that Keras shards across workers (``epoch_steps`` ``None``); on resume the model state is exact
    but the data order of the remaining epochs differs from an uninterrupted run.

    Semi-supervised (``config.labels_per_class``): ``splits.labelled`` gives the labelled rows of every batch
    (weight 1) next to ``batch_size`` rows of the whole training split (weight 0: p(x) only); see
    :func:`jem_tf.data.make_semi_supervised_dataset`.
    """
    num_epochs = config.epochs if num_epochs is None else num_epochs
    train, validation, labelled = splits.train, splits.validation, splits.labelled
    if (config.labels_per_class is not None) != splits.semi_supervised:
        raise ValueError("A semi-supervised config (labels_per_class) needs semi-supervised splits, and only it.")
    if splits.semi_supervised:
        train_ds = make_semi_supervised_dataset(
            train.images, labelled.images, labelled.labels, batch_size=config.batch_size,
            labelled_batch_size=config.labelled_batch_size or max(1, config.batch_size // 4), seed=config.seed,
            first_epoch=first_epoch, num_epochs=num_epochs, augment=config.augment)
        epoch_steps = steps_per_epoch(config, len(train.images))
    elif config.strategy == "multi_worker":
        train_ds = make_dataset(train.images, train.labels, batch_size=config.batch_size, shuffle=True,
                                seed=config.seed, augment=config.augment)
        epoch_steps = None
    else:
        train_ds = make_epochs_dataset(train.images, train.labels, batch_size=config.batch_size, seed=config.seed,
                                       first_epoch=first_epoch, num_epochs=num_epochs, augment=config.augment)
        epoch_steps = steps_per_epoch(config, len(train.images))
    validation_ds = None
    if validation is not None:
        validation_ds = make_dataset(validation.images, validation.labels, batch_size=max(config.batch_size, 256),
                                     shuffle=False)
    return train_ds, validation_ds, epoch_steps
