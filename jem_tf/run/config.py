"""Training configuration: one dataclass of defaults, recipes (JSON files in the repository's
``trainers/`` folder, installed as the package :mod:`jem_tf.recipes`) that override some fields, and
command-line overrides of any field. The rules about the fields' values are in :mod:`jem_tf.run.config_rules`."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import typing
from typing import List, Optional

from jem_tf.errors import UsageError
from jem_tf.run.config_rules import check_config

MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: a recipe is a small JSON object; a larger file is refused unread


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run. Recipes and command-line flags override these defaults.

    The defaults are the paper's JEM settings where they apply (SGLD step 1.0, noise 0.01,
    20 steps, buffer 10,000, restarts 0.05, data noise 0.03, Adam, warm-up, batch 64).
    """

    description: str = ""
    # Data.
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    validation_fraction: float = 0.1
    # An image folder (dataset = a directory): resize every image to [height, width] with resize_method (Pillow);
    # None: every image must have one size. See jem_tf.data.load_image_folder.
    image_size: Optional[List[int]] = None
    resize_method: str = "bilinear"
    # Semi-supervised: keep the labels of N training images per class (balanced, seeded; the validation split
    # keeps all its labels) and train p(x) on every training image. labelled_batch_size: labelled rows added
    # to each batch of `batch_size` unlabelled rows (default: batch_size // 4, chosen on the digits validation
    # split: as accurate as batch_size, lower NLL, cheaper; docs/semi_supervised.md). See
    # jem_tf.run.splits.select_labelled.
    labels_per_class: Optional[int] = None
    labelled_batch_size: Optional[int] = None
    augment: str = "none"
    # Conversion: start from a trained classifier instead of the backbone below: a training work directory or a
    # .keras file holding a jem-tf model or any Keras classifier of the data's image shape and class count
    # (weights copied exactly; a softmax head gives its logits; the optimizer state and replay buffer start
    # fresh; see jem_tf.run.model_files.load_classifier). init_from_sha256: the source file's SHA-256, recorded when
    # the run starts; given in advance it pins the file (another one is refused), and a resumed run checks it.
    init_from: Optional[str] = None
    init_from_sha256: Optional[str] = None
    # A fine-tuning recipe (e.g. fashion_mnist_finetune): its settings are made for a trained classifier, so
    # init_from is required.
    finetune: bool = False
    # Freeze the backbone's batch-norm layers (Keras's trainable=False: inference mode, moving statistics and
    # scale/offset fixed), so that the data's energy and the chains' come from one function. For converting a
    # classifier trained with batch norm: training-mode statistics on the data against inference-mode ones on the
    # chains let the contrastive term play one function against the other (docs/cifar10.md).
    freeze_batch_norm: bool = False
    # Layers of the backbone kept fixed (trainable False): names or name prefixes before "_" (fast_cnn: "stem",
    # "block0", ...); e.g. a conversion that adapts only the late layers. See jem_tf.networks.freeze_layers.
    frozen_layers: List[str] = dataclasses.field(default_factory=list)
    # Conversion only: 0 fine-tunes the classifier; N > 0 keeps it fixed and trains a density head instead: an energy
    # offset g(x), an MLP of N GELU units on its penultimate features, added to every logit, so that p(y|x) stays
    # exactly the classifier's and only the p(x) term trains (jem_tf.model.heads.with_density_head).
    density_head: int = 0
    # With density_head: also fine-tune the classifier under the head (its cross-entropy and the p(x) term train it;
    # the offset's row of ones stays fixed). p(y|x) then changes, as in a fine-tune.
    density_head_finetune: bool = False
    # With density_head: earlier layers of the classifier (exact names, e.g. "stem_act") whose outputs the head reads
    # as well, as per-channel means and standard deviations: low-level statistics the pooled penultimate features
    # may not keep (flat or pixel-shuffled images; jem_tf.model.heads.FeatureStatistics).
    density_head_layers: List[str] = dataclasses.field(default_factory=list)
    # With density_head: "free" lets the offset g(x) take any value; "nonpositive" makes it -softplus(.) <= 0, so
    # the head can only make an input less likely than the classifier's logsumexp has it, never more (inputs
    # unlike anything the chains visit, e.g. flat images, keep the classifier's ranking).
    density_head_offset: str = "free"
    # Divide the model's logits by the temperature that minimises their NLL on the validation split (Guo et al.,
    # 2017; jem_tf.model.heads.with_temperature): calibrated p(y|x), the same predictions. Under a frozen
    # classifier's density head it is fitted to the classifier before training (the head trains on the calibrated
    # logits and keeps them); otherwise to the trained model (after test_time_augmentation), folded into its head.
    temperature_scaling: bool = False
    # With a density head over a frozen classifier: a temperature of the density's own, log p(x) = logsumexp(z / tau)
    # + g(x) where z are the logits (the classifier's, divided by temperature_scaling's temperature when it is on);
    # p(y|x) = softmax(z) is unaffected (jem_tf.model.heads.TemperatureOffset). 1: the logits' own density.
    density_temperature: float = 1.0
    # Backbone (ignored with init_from): "small_cnn", "fast_cnn" (colour images) or "wrn-DEPTH-WIDTH" ("wrn-28-10").
    backbone: str = "small_cnn"
    width: int = 32  # small_cnn: channels of the stem; fast_cnn: channels of the first block.
    normalization: str = "none"  # wrn and fast_cnn: none | batch | layer.
    # fast_cnn's stem: "default" (He init) or "whitened": its kernel set to whiten the 2x2 patches of (up to 5,000)
    # training images, as airbench does (jem_tf.networks.whiten_stem); freeze it with frozen_layers ["stem"].
    stem_init: str = "default"
    dropout: float = 0.0
    # Test-time augmentation, part of the saved model: "none", "flip" or "flip_shift" averages the logits over
    # mirrored (and one-pixel shifted) views of each image. Training runs single-view; the network is wrapped after
    # fit, before the refinement choice, evaluation, saving and export (jem_tf.model.views).
    test_time_augmentation: str = "none"
    # float32 | mixed_bfloat16 | mixed_float16: the network computes in 16 bits (head and SGLD chains
    # stay float32); see networks.with_precision. auto: float32 or mixed_bfloat16, whichever a measured
    # probe on this machine finds faster (jem_tf.training.precision.resolve_precision).
    precision: str = "float32"
    # Optimisation. `batch_size` is the global batch (split over replicas under a strategy).
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    decay_epochs: List[int] = dataclasses.field(default_factory=list)
    decay_rate: float = 0.3
    # JEM objective. classifier_epochs: the first N epochs train a plain classifier (no SGLD steps, energy
    # terms off), a cheap warm start; the JEM objective runs from then on.
    classifier_epochs: int = 0
    pyx_weight: float = 1.0
    px_weight: float = 1.0
    pxy_weight: float = 0.0
    energy_l2_weight: float = 0.0
    # The energy the L2 term pulls towards; none: 0, or with init_from the source classifier's mean energy on
    # the training data (measured at the start and written to config.json). See jem_tf.model.objective.
    energy_l2_center: Optional[float] = None
    # False: the L2 term pulls the data's energies only (not the samples'); see jem_tf.model.objective.
    energy_l2_samples: bool = True
    # Share of the cross-entropy's target spread over all classes (0: none); see jem_tf.model.objective.
    label_smoothing: float = 0.0
    data_noise_std: float = 0.03
    # SGLD and replay buffer.
    sgld_steps: int = 20
    sgld_step_size: float = 1.0
    sgld_noise_std: float = 0.01
    sgld_grad_clip: Optional[float] = None
    sgld_grad_clamp: Optional[float] = None  # JEM++: clamp each gradient element to +-this (proximal step)
    sgld_clamp: bool = False
    sgld_jit_compile: bool = False
    # XLA for the whole train/test/predict step (Keras's jit_compile). Off by default on every device (on CPU
    # it measured slower for a small JEM: docs/performance.md); input checks hold either way (see JEM.compile).
    jit_compile: bool = False
    # Training steps per compiled call (Keras's steps_per_execution); callbacks see every N-th step.
    steps_per_execution: int = 1
    buffer_size: int = 10_000
    buffer_storage: str = "float32"  # float32 | uint8 (4x smaller; see ReplayBuffer)
    restart_prob: float = 0.05
    # Where chains start (buffer fill, restarts, fresh samples): uniform noise (JEM) or class_gaussian
    # (JEM++'s per-class Gaussians of the training split; see jem_tf.sampling.chain_init). chain_init_rank: columns
    # of each class's covariance factor (none: full up to 1,024 pixels, else 256 + a per-pixel residual).
    chain_init: str = "uniform"
    chain_init_rank: Optional[int] = None
    # With class_gaussian: the share of the buffer's fresh chains (fill, restarts) started from uniform noise
    # instead, so that the model also sees images far from the data (its log p(x) can stay blind there).
    chain_init_uniform_fraction: float = 0.0
    # The share of fresh chains (with either chain_init) started from flat, low-frequency fields (one colour
    # everywhere up to a smooth 2x2 blend; jem_tf.sampling.chain_init.flat_fields): images without any detail,
    # which a density never shown them can rank as the most typical of all.
    chain_init_flat_fraction: float = 0.0
    # Run. strategy: default | mirrored | multi_worker (reads TF_CONFIG) | tpu (untested).
    seed: int = 0
    strategy: str = "default"
    devices: List[str] = dataclasses.field(default_factory=list)  # mirrored: e.g. /gpu:0,/gpu:1
    cpu_devices: int = 0  # > 0: split the CPU into this many logical devices (try mirrored without GPUs)
    sample_every_epochs: int = 5
    num_sample_images: int = 64
    checkpoints_to_keep: int = 3
    # Choose test-time refinement settings on the validation split when training ends
    # (jem_tf.evaluation.refinement_choice, rule v2: PGD on validation images; seconds on digits, minutes on
    # Fashion-MNIST). False: the model is saved without them (evaluate chooses them on demand).
    choose_refinement: bool = True
    # Stability guard (jem_tf.training.stability.StabilityGuard): detect divergence and roll back.
    stability_guard: bool = True
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    rollback_extra_sgld_steps: int = 0
    rollback_reset_buffer: bool = False
    max_abs_energy: float = 1e4
    max_energy_gap: float = 1e3
    # If set, export a SavedModel for TensorFlow Serving to EXPORT_DIR/<next version>/ at the end.
    export_dir: Optional[str] = None
    # The exported graph's precision: float32 whatever `precision` trained in, or "trained" (jem_tf.serving).
    serving_precision: str = "float32"

    def validate(self, *, complete: bool = True) -> "TrainConfig":
        """Raises :class:`~jem_tf.errors.UsageError` (a ``ValueError``) naming the first bad field; returns ``self``.
        ``complete=False``: a recipe on its own, before the command line gives what it leaves to the user (a
        fine-tuning recipe's ``init_from``). The rules: :mod:`jem_tf.run.config_rules`."""
        check_config(self, complete=complete)
        return self

    def replace(self, **overrides) -> "TrainConfig":
        """A copy with ``overrides`` applied (unknown names raise :class:`~jem_tf.errors.UsageError`)."""
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise UsageError(f"Unknown config field(s) {unknown}; known fields: {', '.join(field_names())}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_names() -> List[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def field_types() -> dict:
    """Field name -> resolved type annotation."""
    return typing.get_type_hints(TrainConfig)


def recipes_dir() -> str:
    """The directory of the bundled recipes: the package :mod:`jem_tf.recipes` (the repository's
    ``trainers/`` folder, mapped to that name by ``setup.cfg``)."""
    try:
        from jem_tf import recipes
    except ImportError as error:  # a source tree used without `pip install`
        raise UsageError("The bundled recipes (jem_tf.recipes) are not installed: `pip install -e .`, or pass "
                         "--recipe as a path to a JSON file.") from error
    return str(importlib.resources.files(recipes))


def available_recipes() -> List[str]:
    try:
        return sorted(f[:-5] for f in os.listdir(recipes_dir()) if f.endswith(".json"))
    except ValueError:
        return []


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(key)
    return dict(pairs)


def load_recipe(name_or_path: str) -> TrainConfig:
    """Loads a recipe by name (``trainers/NAME.json``) or from a JSON file path.

    A recipe is a JSON object of ``TrainConfig`` fields; unknown fields are an error.
    """
    if name_or_path.endswith(".json") or os.sep in name_or_path:
        path = name_or_path
        if os.path.isdir(path):
            raise UsageError(f"Recipe {path!r} is a directory, not a JSON file.")
        if not os.path.exists(path):
            raise UsageError(f"Recipe file {path!r} does not exist.")
        if not os.path.isfile(path):  # a device (/dev/zero), a FIFO, a socket: reading could block or never end
            raise UsageError(f"Recipe {path!r} is not a regular file (a device, FIFO or socket); pass a JSON file.")
        if os.path.getsize(path) > MAX_RECIPE_BYTES:
            raise UsageError(f"Recipe {path!r} is {os.path.getsize(path):,} bytes, more than a recipe's limit of "
                             f"{MAX_RECIPE_BYTES:,} (a recipe is a small JSON object of config fields).")
    else:
        if name_or_path not in available_recipes():
            raise UsageError(
                f"Unknown recipe {name_or_path!r}; bundled recipes: {', '.join(available_recipes())} "
                "(or pass a path to a JSON file)."
            )
        path = os.path.join(recipes_dir(), name_or_path + ".json")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_RECIPE_BYTES + 1)  # bounded even if the file grew since it was checked
        if len(text) > MAX_RECIPE_BYTES:
            raise UsageError(f"Recipe {path!r} is more than a recipe's limit of {MAX_RECIPE_BYTES:,} bytes.")
        values = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"Recipe {path!r} is not valid JSON: {error}") from error
    except _DuplicateKey as error:
        raise UsageError(f"Recipe {path!r} sets {error.args[0]!r} more than once (JSON would silently keep the "
                         "last value); set each field once.") from None
    except OSError as error:
        raise UsageError(f"Recipe {path!r} cannot be read: {error.strerror or error}") from error
    if not isinstance(values, dict):
        raise UsageError(f"Recipe {path!r} must be a JSON object of config fields.")
    return TrainConfig().replace(**values).validate(complete=False)
