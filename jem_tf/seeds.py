"""Every random stream of jem-tf, in one place.

Training, sampling and data randomness is stateless (``tf.random.stateless_*``): a stream is a shape-[2]
int64 seed, and independent streams come from one seed by folding in a distinct *salt* (:func:`fold`) or by
a distinct second word (``[seed, word]``). Evaluation modes and the images made for the OOD selection draw
from integer seeds instead, each at a distinct *offset* from the seed it is given. Every salt, word and
offset is named here, grouped in :data:`SALT_GROUPS` by the seed it derives from, so that no two streams
share one by accident (``tests/test_seeds.py`` checks each group), and so that changing one is a visible,
deliberate change (it changes every number a seeded run produces).

Training-step streams are :func:`step_seed`: (model seed, reseed count, optimizer step, salt), so a
run is reproducible and resumes exactly (the step is saved with the optimizer, the reseed count with
the model's :class:`SeedState`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

# ------------------------------------------------------------------ salts folded into a seed (fold)
# JEM.train_step (jem_tf.model.chains): data noise, replay-buffer draws and SGLD of the p(x) chains, the same for
# p(x|y).
STEP_DATA_NOISE, STEP_DRAW, STEP_SGLD, STEP_DRAW_CONDITIONAL, STEP_SGLD_CONDITIONAL = 1, 2, 3, 4, 5
# JEM.sample / JEM.refine and the exported `sample` signature: the SGLD noise (the start is drawn from the
# caller's seed itself), the same in both so that the same seed gives the same images.
SAMPLE_SGLD = STEP_SGLD
# ReplayBuffer.draw: which chains, which restart, the restart noise, uint8 dequantisation.
DRAW_INDEX, DRAW_RESTART, DRAW_NOISE, DRAW_DEQUANTIZE = 11, 12, 13, 14
# ReplayBuffer fresh chains with a uniform_fraction / flat_fraction: which chains start from noise (or a flat
# field), their noise, the flat fields' colours and their spread.
FRESH_PICK_UNIFORM, FRESH_UNIFORM, FRESH_FLAT, FRESH_FLAT_SPREAD = 15, 16, 17, 18
# ClassGaussian.sample: the class of each chain, the latent Gaussian, the per-pixel residual.
INIT_CLASS, INIT_LATENT, INIT_RESIDUAL = 21, 22, 23
# data.augment_images: the crop offsets and the flips of a batch.
AUGMENT_CROP, AUGMENT_FLIP = 1, 2
# data.make_semi_supervised_dataset, per batch: the labelled rows drawn, the order of the joined rows, their
# augmentation.
BATCH_PICK_LABELLED, BATCH_SHUFFLE_ROWS, BATCH_AUGMENT = 1, 2, 3
# attacks.PGD: iteration i folds in PGD_FIRST_STEP + i (the random start uses the batch's seed itself).
PGD_FIRST_STEP = 2

# ------------------------------------------------------------------ second words of a [seed, word] seed
# data.make_dataset: the augmentation of batch i is [seed, MAKE_DATASET_AUGMENT] with i folded in.
MAKE_DATASET_AUGMENT = 7
# precision.time_jem_step: the probe's images and labels.
PROBE_IMAGES, PROBE_LABELS = 1, 2
# run.select_labelled: the labelled images of a semi-supervised run (numpy's default_rng([seed, word])).
LABELLED_SUBSET = 2
# StabilityGuard(reset_buffer=True): the refill after rollback number r uses seed [model seed, 1000 + r]
# (the initial fill is [model seed, 0]).
BUFFER_RESET_OFFSET = 1000
# evaluation.refinement_choice.choose_refinement: the batch at offset a, refined to k steps, uses
# [seed, k * stride + a].
REFINE_STEPS_STRIDE = 100_003

# ------------------------------------------------------------------ offsets added to an integer seed
# attacks.PGD: the radius of the L2 random start (both words of the batch's seed + 1).
PGD_START_RADIUS = 1
# evaluation.evaluate_samples: the unconditional chains, the class-conditional ones (start and chains), the
# replay-buffer draw and the long chains (whose segment i refines with [seed + SAMPLES_LONG_CHAIN, i + 1]).
SAMPLES_UNCONDITIONAL, SAMPLES_CONDITIONAL, SAMPLES_BUFFER, SAMPLES_LONG_CHAIN = 0, 1, 2, 3
# evaluation.load_ood_sets: the i-th synthetic OOD set is drawn with seed + OOD_SET_OFFSET + i.
OOD_SET_OFFSET = 1
# ood.select_detector: the i-th outlier or accepted-shift kind is made with seed + OUTLIER_KIND_OFFSET + i.
OUTLIER_KIND_OFFSET = 1
# evaluation.evaluate_frechet: the buffer draw uses the seed, the fresh samples of the batch at offset a
# seed + FRECHET_SAMPLES_OFFSET + a.
FRECHET_SAMPLES_OFFSET = 1

# The salts, words and offsets derived from the same seed, by kind: within a kind they must differ.
SALT_GROUPS = {
    "training step (step_seed)": ("STEP_DATA_NOISE", "STEP_DRAW", "STEP_SGLD", "STEP_DRAW_CONDITIONAL",
                                  "STEP_SGLD_CONDITIONAL"),
    "sample/refine call": ("SAMPLE_SGLD",),
    "replay-buffer draw": ("DRAW_INDEX", "DRAW_RESTART", "DRAW_NOISE", "DRAW_DEQUANTIZE"),
    "fresh chain start": ("FRESH_PICK_UNIFORM", "FRESH_UNIFORM", "FRESH_FLAT", "FRESH_FLAT_SPREAD", "INIT_CLASS",
                          "INIT_LATENT", "INIT_RESIDUAL"),
    "augmentation of a batch": ("AUGMENT_CROP", "AUGMENT_FLIP"),
    "semi-supervised batch": ("BATCH_PICK_LABELLED", "BATCH_SHUFFLE_ROWS", "BATCH_AUGMENT"),
    "PGD batch": ("PGD_FIRST_STEP", "PGD_START_RADIUS"),
    "make_dataset": ("MAKE_DATASET_AUGMENT",),
    "precision probe": ("PROBE_IMAGES", "PROBE_LABELS"),
    "semi-supervised labels": ("LABELLED_SUBSET",),
    "replay-buffer reset": ("BUFFER_RESET_OFFSET",),
    "refinement choice": ("REFINE_STEPS_STRIDE",),
    "evaluation samples": ("SAMPLES_UNCONDITIONAL", "SAMPLES_CONDITIONAL", "SAMPLES_BUFFER", "SAMPLES_LONG_CHAIN"),
    "synthetic OOD sets": ("OOD_SET_OFFSET",),
    "OOD selection outliers": ("OUTLIER_KIND_OFFSET",),
    "Fréchet samples": ("FRECHET_SAMPLES_OFFSET",),
}


def as_stateless_seed(seed) -> tf.Tensor:
    """Turns an int or a shape-[2] integer tensor into a stateless-RNG seed (int64 [2])."""
    if isinstance(seed, int):
        return tf.constant([seed, 0], dtype=tf.int64)
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank != 1 or (seed.shape[0] is not None and seed.shape[0] != 2):
        raise ValueError(f"`seed` must be an int or a shape-[2] integer tensor; received {seed!r}")
    return tf.cast(seed, tf.int64)


def fold(seed, *values) -> tf.Tensor:
    """``seed`` with each of ``values`` folded in, in order (``stateless_fold_in``)."""
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    for value in values:
        seed = tf.random.experimental.stateless_fold_in(seed, value)
    return seed


def step_seed(base_seed: int, reseeds, step, salt: int) -> tf.Tensor:
    """The training stream ``salt`` at optimizer ``step``: ``[base_seed, 0]`` folded with the reseed
    count, the step and the salt. The same on every replica: random numbers are drawn for the global
    batch and each replica keeps its own rows (see :mod:`jem_tf.sampling.distribution`)."""
    return fold(tf.constant([base_seed, 0], tf.int64), reseeds, tf.cast(step, tf.int64), salt)


def buffer_reset_seed(base_seed: int, reseeds: int) -> list:
    """The seed of the replay-buffer refill after rollback number ``reseeds``."""
    return [base_seed, BUFFER_RESET_OFFSET + reseeds]


@keras.saving.register_keras_serializable(package="jem_tf")
class SeedState(keras.layers.Layer):
    """Holds ``reseeds``, a saved counter folded into every training seed. Incrementing it (e.g. after a
    divergence rollback) gives the run fresh random numbers while staying reproducible."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reseeds = self.add_weight(name="reseeds", shape=(), dtype="int64", initializer="zeros",
                                       trainable=False, aggregation="only_first_replica")
        self.built = True

    def call(self, inputs=None):
        raise NotImplementedError("SeedState is not called.")
