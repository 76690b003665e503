"""Every rule about a :class:`~jem_tf.run.config.TrainConfig`'s fields, one function per concern: the checks of
:meth:`TrainConfig.validate <jem_tf.run.config.TrainConfig.validate>` (:func:`check_config`), the two that need the
data (:func:`check_labels_per_class`, :func:`check_steps_per_execution`), the values of each choice field
(:func:`choices`) and the fields a resumed run must keep (:data:`RESUME_FIXED_FIELDS`).

Each raises :class:`~jem_tf.errors.UsageError` naming the field and the value received. Nothing here imports
TensorFlow when imported (so neither does :mod:`jem_tf.run.config`): the choices' names are plain data
(:mod:`jem_tf.choices`).
"""

from __future__ import annotations

import math
import typing
from typing import TYPE_CHECKING, Dict, List, Mapping, NoReturn

from jem_tf import choices as names
from jem_tf.errors import UsageError

if TYPE_CHECKING:
    from jem_tf.run.config import TrainConfig


# Settings a resumed run must share with the interrupted one: they fix the shapes of the saved state (network,
# optimizer, replay buffer) or which images are training data. The others (learning rate, SGLD and loss
# settings, epochs, ...) may change on resume, e.g. to get past a divergence.
RESUME_FIXED_FIELDS = ("dataset", "image_size", "resize_method", "validation_fraction", "seed", "backbone", "width",
                       "normalization", "precision", "batch_size", "optimizer", "buffer_size", "buffer_storage",
                       "chain_init", "chain_init_rank", "pxy_weight", "labels_per_class", "labelled_batch_size",
                       "init_from", "init_from_sha256", "freeze_batch_norm", "frozen_layers", "density_head",
                       "density_head_finetune", "density_head_layers", "density_head_offset",
                       "temperature_scaling", "density_temperature")


def choices() -> Dict[str, tuple]:
    """Choice field -> the values it takes (plain data from :mod:`jem_tf.choices`)."""
    return {"augment": names.AUGMENTATIONS, "resize_method": names.RESIZE_METHODS,
            "normalization": names.NORMALIZATIONS, "stem_init": names.STEM_INITS, "optimizer": names.OPTIMIZERS,
            "strategy": names.STRATEGIES,
            "precision": names.PRECISIONS + ("auto",), "buffer_storage": names.BUFFER_STORAGES,
            "chain_init": names.CHAIN_INITS, "serving_precision": names.SERVING_PRECISIONS,
            "test_time_augmentation": names.TEST_TIME_AUGMENTATIONS,
            "density_head_offset": names.DENSITY_HEAD_OFFSETS}


def check_config(config: TrainConfig, *, complete: bool = True) -> None:
    """Raises :class:`~jem_tf.errors.UsageError` naming the first bad field of ``config``: types first, then each
    concern's rules. ``complete=False``: a recipe on its own (a fine-tuning recipe may leave ``init_from`` out)."""
    _check_types(config)
    for check in (_check_data, _check_semi_supervised, _check_network, _check_optimisation, _check_objective,
                  _check_sampler, _check_run, _check_stability):
        check(config)
    _check_conversion(config, complete=complete)


# ---------------------------------------------------------------- the rules of each concern's fields
def _fail(config: TrainConfig, field: str, expected: str) -> NoReturn:
    raise UsageError(f"{field} must be {expected}; received {getattr(config, field)!r}")


def _one_of(config: TrainConfig, field: str) -> None:
    allowed = choices()[field]
    if getattr(config, field) not in allowed:
        _fail(config, field, f"one of {', '.join(allowed)}")


def _integers_at_least(config: TrainConfig, minimum: int, *fields: str) -> None:
    for field in fields:
        if getattr(config, field) < minimum:
            _fail(config, field, f"an integer >= {minimum}")


def _positive(config: TrainConfig, *fields: str) -> None:
    for field in fields:
        if not getattr(config, field) > 0:
            _fail(config, field, "a number > 0")


def _non_negative(config: TrainConfig, *fields: str) -> None:
    for field in fields:
        if not getattr(config, field) >= 0:
            _fail(config, field, "a number >= 0")


def _optional_at_least_one(config: TrainConfig, *fields: str) -> None:
    for field in fields:
        if getattr(config, field) is not None and getattr(config, field) < 1:
            _fail(config, field, "an integer >= 1 or none")


def _check_types(config: TrainConfig) -> None:
    """Types first (recipes are JSON: "one", null, 1.5 or true where an int belongs), and finite numbers."""
    for field, annotation in typing.get_type_hints(type(config)).items():
        if not _has_type(getattr(config, field), annotation):
            _fail(config, field, _type_name(annotation))


def _check_data(config: TrainConfig) -> None:
    from jem_tf.data.loading import dataset_problem  # reads a .npz file's headers; imports TensorFlow

    # A known name, another tfds image classification name or an existing .npz file with training images.
    dataset_expected = dataset_problem(config.dataset, training=True)
    if dataset_expected is not None:
        _fail(config, "dataset", dataset_expected)
    if not 0.0 <= config.validation_fraction < 1.0:
        _fail(config, "validation_fraction", "in [0, 1)")
    if config.export_dir and config.validation_fraction <= 0:
        # The export's OOD detector is selected and calibrated on the validation split, never the test split.
        _fail(config, "validation_fraction", "> 0 when export_dir is set (the OOD detector is calibrated on the "
                                             "validation split; export later with `python -m jem_tf.export "
                                             "--calibration-split test` to use the test split explicitly)")
    _one_of(config, "augment")
    if config.image_size is not None:
        from jem_tf.data.folders import is_image_folder_name

        if (len(config.image_size) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                               for d in config.image_size)):
            _fail(config, "image_size", "none or two ints >= 1, height and width (--image-size H W)")
        if not is_image_folder_name(config.dataset):
            _fail(config, "image_size", "none unless the dataset is an image folder (it resizes the folder's images)")
    _one_of(config, "resize_method")


def _check_semi_supervised(config: TrainConfig) -> None:
    _optional_at_least_one(config, "labels_per_class", "labelled_batch_size")
    if config.labelled_batch_size is not None and config.labels_per_class is None:
        _fail(config, "labelled_batch_size", "none unless labels_per_class is set")
    if config.labels_per_class is not None and config.strategy == "multi_worker":
        _fail(config, "labels_per_class",
              "none under multi_worker (semi-supervised batches are not sharded by element)")


def check_labels_per_class(config: TrainConfig, class_counts: Mapping[int, int]) -> None:
    """``labels_per_class`` against the training split it selects from (class id -> images, in class order): an
    integer >= 1 (a semi-supervised run) and at most the images of the smallest class; ``labelled_batch_size``
    at most the labelled images.

    Raises:
        UsageError: naming the value and the smallest class.
    """
    n = config.labels_per_class
    if n is None or n < 1:
        raise UsageError(f"labels_per_class must be an integer >= 1; received {n!r}")
    smallest = min(class_counts, key=class_counts.get)
    if n > class_counts[smallest]:
        raise UsageError(f"labels_per_class ({n}) is more than the {class_counts[smallest]} training images of class "
                         f"{smallest} (after the validation split); use at most {class_counts[smallest]}.")
    labelled = n * len(class_counts)
    if config.labelled_batch_size is not None and config.labelled_batch_size > labelled:
        raise UsageError(f"labelled_batch_size ({config.labelled_batch_size}) is more than the {labelled} labelled "
                         f"images (labels_per_class {n} x {len(class_counts)} classes); use at most {labelled}.")


def _check_conversion(config: TrainConfig, *, complete: bool) -> None:
    if complete and config.finetune and config.init_from is None:
        _fail(config, "init_from", "the trained classifier this fine-tuning recipe converts (--init-from PATH: a "
                                   "training work directory or a .keras file)")
    if config.init_from is not None and not config.init_from.strip():
        _fail(config, "init_from", "a path to a .keras file or a training work directory, or none")
    if config.init_from_sha256 is not None and (
            config.init_from is None or len(config.init_from_sha256) != 64
            or any(c not in "0123456789abcdef" for c in config.init_from_sha256)):
        _fail(config, "init_from_sha256",
              "none, or the 64 lowercase hex digits of init_from's SHA-256 (with init_from)")
    _integers_at_least(config, 0, "density_head")
    if config.density_head and config.init_from is None and (complete or not config.finetune):
        _fail(config, "density_head", "0 without init_from (a density head is added to a classifier being converted)")
    if config.density_head and config.px_weight <= 0:
        _fail(config, "density_head", "0 with px_weight 0 (only the p(x) term trains the density head)")
    if config.density_head_finetune and not config.density_head:
        _fail(config, "density_head_finetune", "false with density_head 0 (it fine-tunes the classifier under a "
                                               "density head)")
    if config.density_head_layers and not config.density_head:
        _fail(config, "density_head_layers", "empty with density_head 0 (they are what a density head reads)")
    if len(set(config.density_head_layers)) != len(config.density_head_layers):
        _fail(config, "density_head_layers", "distinct layer names")
    _one_of(config, "density_head_offset")
    if config.density_head_offset != "free" and not config.density_head:
        _fail(config, "density_head_offset", "'free' with density_head 0 (it bounds a density head's offset)")
    if config.temperature_scaling and config.validation_fraction <= 0:
        _fail(config, "temperature_scaling", "false with validation_fraction 0 (the temperature is fitted on the "
                                             "validation split)")
    _positive(config, "density_temperature")
    if config.density_temperature != 1 and (not config.density_head or config.density_head_finetune):
        _fail(config, "density_temperature", "1 unless a density head keeps the classifier frozen (density_head > 0, "
                                             "density_head_finetune false)")


def _check_network(config: TrainConfig) -> None:
    if not (config.backbone in ("small_cnn", "fast_cnn") or _is_wrn_name(config.backbone)):
        _fail(config, "backbone", "'small_cnn', 'fast_cnn' or 'wrn-DEPTH-WIDTH' with DEPTH = 6n+4 (e.g. wrn-28-10)")
    _integers_at_least(config, 1, "width")
    _one_of(config, "normalization")
    _one_of(config, "stem_init")
    if config.stem_init == "whitened" and config.backbone != "fast_cnn":
        _fail(config, "stem_init", f"'default' with backbone {config.backbone!r} (only fast_cnn has a stem to whiten)")
    if not 0.0 <= config.dropout < 1.0:
        _fail(config, "dropout", "in [0, 1)")
    _one_of(config, "test_time_augmentation")
    _one_of(config, "precision")
    if config.precision == "auto" and config.strategy == "multi_worker":
        # Each machine would time its own probe and could choose differently.
        _fail(config, "precision", "explicit (float32 or mixed_bfloat16) under multi_worker, not auto")


def _check_optimisation(config: TrainConfig) -> None:
    _integers_at_least(config, 1, "epochs", "batch_size", "steps_per_execution")
    _integers_at_least(config, 0, "warmup_steps", "classifier_epochs")
    _one_of(config, "optimizer")
    _positive(config, "learning_rate", "decay_rate")
    _non_negative(config, "weight_decay")
    if any(e < 1 for e in config.decay_epochs) or config.decay_epochs != sorted(config.decay_epochs):
        _fail(config, "decay_epochs", "increasing epochs >= 1")
    if config.classifier_epochs >= config.epochs and config.classifier_epochs > 0:
        _fail(config, "classifier_epochs", f"fewer than epochs ({config.epochs})")


def check_steps_per_execution(config: TrainConfig, steps_per_epoch: int) -> None:
    """``steps_per_execution`` must divide the steps per epoch: a partial last execution would run into
    the next epoch's batches (and break exact resumption)."""
    if steps_per_epoch % config.steps_per_execution:
        divisors = [str(d) for d in range(1, min(steps_per_epoch, 64) + 1) if steps_per_epoch % d == 0]
        raise UsageError(f"steps_per_execution ({config.steps_per_execution}) must divide the {steps_per_epoch} "
                         f"training steps per epoch (e.g. {', '.join(divisors)}).")


def _check_objective(config: TrainConfig) -> None:
    _non_negative(config, "pyx_weight", "px_weight", "pxy_weight", "energy_l2_weight", "data_noise_std")
    if not 0.0 <= config.label_smoothing < 1.0:
        _fail(config, "label_smoothing", "in [0, 1)")


def _check_sampler(config: TrainConfig) -> None:
    _integers_at_least(config, 1, "sgld_steps", "buffer_size")
    _positive(config, "sgld_step_size")
    _non_negative(config, "sgld_noise_std")
    for field in ("sgld_grad_clip", "sgld_grad_clamp"):
        if getattr(config, field) is not None and not getattr(config, field) > 0:
            _fail(config, field, "a number > 0 or none")
    _one_of(config, "buffer_storage")
    if not 0.0 <= config.restart_prob <= 1.0:
        _fail(config, "restart_prob", "in [0, 1]")
    if config.pxy_weight > 0 and config.buffer_size < 10:
        _fail(config, "buffer_size", "at least the number of classes when pxy_weight > 0")
    _one_of(config, "chain_init")
    _optional_at_least_one(config, "chain_init_rank")
    if not 0.0 <= config.chain_init_uniform_fraction <= 1.0:
        _fail(config, "chain_init_uniform_fraction", "in [0, 1]")
    if config.chain_init_uniform_fraction > 0 and config.chain_init != "class_gaussian":
        _fail(config, "chain_init_uniform_fraction", "0 unless chain_init is 'class_gaussian'")
    if not 0.0 <= config.chain_init_flat_fraction <= 1.0 - config.chain_init_uniform_fraction:
        _fail(config, "chain_init_flat_fraction", "in [0, 1 - chain_init_uniform_fraction]")


def _check_run(config: TrainConfig) -> None:
    _one_of(config, "strategy")
    if config.devices and config.strategy != "mirrored":
        _fail(config, "devices", "empty unless strategy is 'mirrored'")
    _integers_at_least(config, 0, "cpu_devices")
    _integers_at_least(config, 1, "sample_every_epochs", "num_sample_images", "checkpoints_to_keep")
    _one_of(config, "serving_precision")


def _check_stability(config: TrainConfig) -> None:
    _integers_at_least(config, 0, "max_rollbacks", "rollback_extra_sgld_steps")
    if not 0.0 < config.rollback_lr_factor <= 1.0:
        _fail(config, "rollback_lr_factor", "in (0, 1]")
    _positive(config, "max_abs_energy", "max_energy_gap")


def _has_type(value, annotation) -> bool:
    """Whether ``value`` is of the field type ``annotation`` (bools are not numbers; floats are finite)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return any(_has_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin in (list, List):
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, List):
        return "a list of " + {int: "integers", float: "finite numbers", str: "strings"}.get(args[0], "values")
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _is_wrn_name(name: str) -> bool:
    parts = name.split("-")
    return (len(parts) == 3 and parts[0] == "wrn" and parts[1].isdigit() and parts[2].isdigit()
            and int(parts[1]) >= 10 and (int(parts[1]) - 4) % 6 == 0 and int(parts[2]) >= 1)
