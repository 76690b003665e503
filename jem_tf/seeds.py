"""Every random stream of jem-tf, in one place.

All randomness is stateless (``tf.random.stateless_*``): a stream is a shape-[2] int64 seed, and
independent streams come from one seed by folding in a distinct *salt*. The salts are listed here so
that no two streams share one by accident, and so that changing one is a visible, deliberate change
(it changes every number a seeded run produces).

Training-step streams are :func:`step_seed`: (model seed, reseed count, optimizer step, salt), so a
run is reproducible and resumes exactly (the step is saved with the optimizer, the reseed count with
the model's :class:`SeedState`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

# JEM.train_step: data noise, replay-buffer draws and SGLD of the p(x) chains, the same for p(x|y).
STEP_DATA_NOISE, STEP_DRAW, STEP_SGLD, STEP_DRAW_CONDITIONAL, STEP_SGLD_CONDITIONAL = 1, 2, 3, 4, 5
# JEM.sample / JEM.refine: the SGLD noise (the start is drawn from the caller's seed itself).
SAMPLE_SGLD = STEP_SGLD
# ReplayBuffer.draw: which chains, which restart, the restart noise, uint8 dequantisation.
DRAW_INDEX, DRAW_RESTART, DRAW_NOISE, DRAW_DEQUANTIZE = 11, 12, 13, 14
# ReplayBuffer fresh chains with a uniform_fraction: which chains start from noise, and their noise.
FRESH_PICK_UNIFORM, FRESH_UNIFORM = 15, 16
# ClassGaussian.sample: the class of each chain, the latent Gaussian, the per-pixel residual.
INIT_CLASS, INIT_LATENT, INIT_RESIDUAL = 21, 22, 23
# The exported `sample` signature: the SGLD noise (the start is drawn from the request's seed).
SERVING_SGLD = 1
# StabilityGuard(reset_buffer=True): the refill after rollback number r uses seed [model seed, 1000 + r].
BUFFER_RESET_OFFSET = 1000


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
    batch and each replica keeps its own rows (see :mod:`jem_tf.distribution`)."""
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
