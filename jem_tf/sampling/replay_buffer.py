"""Persistent replay buffer of SGLD chains (persistent contrastive divergence)."""

from __future__ import annotations

import collections
import warnings
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from jem_tf import seeds
from jem_tf.choices import BUFFER_STORAGES as STORAGES
from jem_tf.data.inputs import check_value_range
from jem_tf.sampling.chain_init import ClassGaussian, check_flat_fraction, start_chains
from jem_tf.sampling.distribution import BatchPosition, all_gather_rows, replica_random

# A buffer larger than this gets a warning with its size before it is allocated.
LARGE_BUFFER_BYTES = 1 << 30


BufferDraw = collections.namedtuple("BufferDraw", ["x", "indices", "restarted"])
BufferDraw.__doc__ = """Chains drawn from a replay buffer: starting points ``x`` [batch, ...], the
slot ``indices`` [batch] to write them back to, and the boolean ``restarted`` [batch] mask of
chains restarted from uniform noise."""


@keras.saving.register_keras_serializable(package="jem_tf")
class ReplayBuffer(keras.layers.Layer):
    """A non-trainable buffer of SGLD chain states, saved and restored with the model.

    Each training step draws ``batch`` slots at random, restarts each drawn chain from its start
    distribution (``init``: uniform noise on ``value_range`` by default, or JEM++'s per-class Gaussians
    :class:`~jem_tf.sampling.chain_init.ClassGaussian`) with probability ``restart_prob``, runs SGLD on them and writes
    the result back to the same slots with :meth:`update` (an in-place scatter; the buffer is
    never copied as a whole).

    With ``num_classes`` set the buffer is split into ``num_classes`` contiguous slots of
    ``size // num_classes`` chains, one per class, for class-conditional sampling ``p(x|y)``;
    unconditional draws then take chains from the whole buffer.

    Under ``tf.distribute`` (mirrored, multi-worker) the buffer is one shared buffer, mirrored on every
    replica, rather than per-replica shards: shards would change which chains a step can draw with the
    number of replicas, while a shared buffer keeps training identical to single-device training. What
    keeps the copies exact (measured; see the project's technical notes): the variable is created with
    aggregation ``ONLY_FIRST_REPLICA`` (synchronised on write), and :meth:`update` all-gathers every
    replica's ``(indices, samples)`` and applies the *same* in-place scatter on every replica. The
    default settings let the copies silently diverge; ``MEAN`` aggregation silently averages new and
    old rows; ``ONLY_FIRST_REPLICA`` without the all-gather silently drops the other replicas' chains.
    Draws use the global batch's random numbers (see :mod:`jem_tf.sampling.distribution`), so replicas draw
    different slots and restarts. The variable is saved once and restores onto every replica.

    Args:
        image_shape: Shape of one sample, e.g. ``(32, 32, 3)``.
        size: Number of chains. Default 10,000.
        restart_prob: Probability that a drawn chain restarts from noise. Default 0.05.
        num_classes: If set, keep per-class slots (see above). Default ``None``.
        value_range: ``(low, high)`` of the uniform initialisation and restarts. Default (-1, 1).
        seed: Seed of the initial fill. Default ``None`` (random; a ``ClassGaussian`` fill uses 0).
        init: ``None`` (uniform noise) or a fitted :class:`~jem_tf.sampling.chain_init.ClassGaussian`: the initial
            fill (slot ``i`` of ``size`` starts from class ``i * num_classes // size``, so every class has
            its share; per-class slots start from their class) and every restart (class-conditional draws
            restart from the drawn label's Gaussian, unconditional ones from a class drawn with the prior).
            Saved with the buffer.
        uniform_fraction: With ``init``, the share of fresh chains (fill and restarts) that start from
            uniform noise on ``value_range`` instead: chains that only ever start near the data never show
            the model images far from it, so its density can stay blind there. Default 0.
        flat_fraction: The share of fresh chains (with or without ``init``) that start from low-frequency
            fields instead (:func:`~jem_tf.sampling.chain_init.flat_fields`: one colour everywhere up to a
            smooth 2x2 blend), so that the density also learns that images without detail are unlikely.
            Default 0.
        storage: ``"float32"`` (default) or ``"uint8"``: chains stored as 256 levels of
            ``value_range`` (4x less memory, as IGEBM does). Written chains are clipped to the range and
            quantised; drawn chains are dequantised with uniform noise within their level, so stored
            values never repeat exactly.

    Example:
        >>> buffer = ReplayBuffer(image_shape=(8, 8, 1), size=100, seed=0)
        >>> draw = buffer.draw(16, seed=[1, 2])
        >>> buffer.update(draw.indices, draw.x * 0.5)
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        size: int = 10_000,
        restart_prob: float = 0.05,
        num_classes: Optional[int] = None,
        value_range: Sequence[float] = (-1.0, 1.0),
        seed: Optional[int] = None,
        storage: str = "float32",
        init: Optional[ClassGaussian] = None,
        uniform_fraction: float = 0.0,
        flat_fraction: float = 0.0,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")  # The chains stay float32 under mixed precision.
        super().__init__(**kwargs)
        image_shape = tuple(int(d) for d in image_shape)
        if not image_shape or any(d < 1 for d in image_shape):
            raise ValueError(f"`image_shape` must be positive dimensions; received {image_shape!r}")
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"`size` must be an int >= 1; received size={size!r}")
        if not 0.0 <= restart_prob <= 1.0:
            raise ValueError(f"`restart_prob` must be in [0, 1]; received restart_prob={restart_prob!r}")
        if num_classes is not None and not (isinstance(num_classes, int) and 1 <= num_classes <= size):
            raise ValueError(
                f"`num_classes` must be None or an int in [1, size={size}]; received {num_classes!r}"
            )
        value_range = check_value_range(value_range)
        if storage not in STORAGES:
            raise ValueError(f"`storage` must be one of {STORAGES}; received {storage!r}")
        if isinstance(init, dict):
            init = keras.saving.deserialize_keras_object(init)
        if init is not None:
            if not isinstance(init, ClassGaussian):
                raise ValueError(f"`init` must be None (uniform) or a ClassGaussian; received {init!r}")
            if init.image_shape != image_shape or (num_classes is not None and init.num_classes != num_classes):
                raise ValueError(f"`init` draws images {init.image_shape} of {init.num_classes} classes; the buffer "
                                 f"holds {image_shape}" + ("" if num_classes is None else f" of {num_classes} classes"))
        if not (isinstance(uniform_fraction, (int, float)) and 0.0 <= uniform_fraction <= 1.0):
            raise ValueError(f"`uniform_fraction` must be in [0, 1]; received uniform_fraction={uniform_fraction!r}")
        if uniform_fraction > 0 and init is None:
            raise ValueError("`uniform_fraction` > 0 needs an `init` (without one every fresh chain is uniform noise).")
        check_flat_fraction(flat_fraction, uniform_fraction=uniform_fraction, image_shape=image_shape)
        self.init = init
        self.uniform_fraction, self.flat_fraction = float(uniform_fraction), float(flat_fraction)
        self.storage = storage
        self.image_shape = image_shape
        self.size = size
        self.restart_prob = float(restart_prob)
        self.num_classes = num_classes
        self.value_range = value_range
        self.seed = seed
        num_bytes = size * int(np.prod(image_shape)) * (1 if storage == "uint8" else 4)
        if num_bytes > LARGE_BUFFER_BYTES:  # said before the memory is allocated
            warnings.warn(
                f"The replay buffer of {size:,} chains of {image_shape} images ({storage}) takes "
                f"{num_bytes / 2**30:.1f} GiB of memory (per replica under a distribution strategy); lower "
                "buffer_size, or use buffer_storage='uint8' (4x smaller).", stacklevel=2)
        if init is not None:
            def initializer(shape, dtype=None):
                return self._encode(self._init_fill(shape[0], tf.constant([0 if seed is None else seed, 0], tf.int64)))
        elif storage == "uint8":
            def initializer(shape, dtype=None):
                return tf.cast(keras.random.randint(shape, 0, 256, dtype="int32", seed=seed), tf.uint8)
        else:
            initializer = keras.initializers.RandomUniform(value_range[0], value_range[1], seed=seed)
        self.samples = self.add_weight(
            name="samples",
            shape=(size,) + image_shape,
            initializer=initializer,
            trainable=False,
            dtype=storage,
            autocast=False,
            aggregation="only_first_replica",
        )
        self.built = True

    # Storage <-> float32 chains. uint8 level q covers [low + q * w, low + (q + 1) * w), w = range / 256.
    def _encode(self, x: tf.Tensor) -> tf.Tensor:
        if self.storage == "float32":
            return x
        low, high = self.value_range
        codes = tf.floor((x - low) * (256.0 / (high - low)))
        return tf.cast(tf.clip_by_value(codes, 0.0, 255.0), tf.uint8)

    def _decode(self, stored: tf.Tensor, offset=0.5) -> tf.Tensor:
        """float32 values of stored chains; uint8: ``offset`` in [0, 1) places them within their level."""
        if self.storage == "float32":
            return stored
        low, high = self.value_range
        return low + (tf.cast(stored, tf.float32) + offset) * ((high - low) / 256.0)

    def read(self, indices: tf.Tensor) -> tf.Tensor:
        """The stored chains at ``indices`` as float32 (uint8 storage: the centres of their levels)."""
        return self._decode(tf.gather(self.samples.value, indices))

    def chains(self) -> tf.Tensor:
        """Every stored chain as float32 ``[size, *image_shape]``."""
        return self._decode(self.samples.value)

    def describe(self) -> str:
        """What the buffer holds, for a model summary: its values (counted by Keras as non-trainable parameters),
        their size as float32, and its chains."""
        values = int(np.prod(self.samples.shape))
        return (f"{values:,} ({4 * values / 2 ** 20:.2f} MB as float32) are the replay buffer: {self.size:,} SGLD "
                f"chains of {'x'.join(map(str, self.image_shape))} images (sampler state, not weights)")

    @property
    def slots_per_class(self) -> Optional[int]:
        """Chains per class when the buffer is class-conditional, else ``None``."""
        return None if self.num_classes is None else self.size // self.num_classes

    def slot_labels(self) -> tf.Tensor:
        """The class each slot starts from in a ``ClassGaussian`` fill: ``[size]`` int32, contiguous
        blocks (the per-class slots when the buffer has them)."""
        classes = self.num_classes if self.num_classes is not None else self.init.num_classes
        if self.num_classes is not None:
            slot = tf.range(self.size) // self.slots_per_class
            return tf.minimum(slot, classes - 1)
        return tf.range(self.size) * classes // self.size

    def fresh_chains(self, num, seed, labels=None, position: Optional[BatchPosition] = None) -> tf.Tensor:
        """``num`` float32 chains from the start distribution (:func:`jem_tf.sampling.chain_init.start_chains`: uniform
        noise, or ``init``'s Gaussians of ``labels`` with a ``uniform_fraction`` of uniform noise; a ``flat_fraction``
        of flat fields): where restarts and the fill start, and what ``JEM.sample`` and the served ``sample``
        signature start from. ``position`` as in :meth:`draw`."""
        return start_chains(num, seed, image_shape=self.image_shape, value_range=self.value_range, init=self.init,
                            uniform_fraction=self.uniform_fraction, flat_fraction=self.flat_fraction, labels=labels,
                            position=position)

    def _init_fill(self, size, seed) -> tf.Tensor:
        """A whole buffer's worth of fresh chains (slot blocks per class for a ``ClassGaussian`` start)."""
        return self.fresh_chains(size, seed, labels=None if self.init is None else self.slot_labels())

    def draw(self, batch_size, seed, labels: Optional[tf.Tensor] = None,
             position: Optional[BatchPosition] = None) -> BufferDraw:
        """Draws ``batch_size`` chains (with replacement) and applies random restarts.

        Args:
            batch_size: Number of chains (int or scalar tensor).
            seed: Shape-[2] integer seed for the stateless RNG.
            labels: Optional int tensor ``[batch]``: draw chain ``i`` from class ``labels[i]``'s
                slots (needs ``num_classes``).
            position: Optional ``(offset, global_batch_size)``: draw the random numbers of the global
                batch and keep this replica's rows (see :mod:`jem_tf.sampling.distribution`).

        Returns:
            A :class:`BufferDraw`.
        """
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
        index_seed, restart_seed, noise_seed, dequantize_seed = [
            seeds.fold(seed, salt) for salt in (seeds.DRAW_INDEX, seeds.DRAW_RESTART, seeds.DRAW_NOISE,
                                                seeds.DRAW_DEQUANTIZE)
        ]
        def uniform(seed, **kwargs):
            return replica_random(tf.random.stateless_uniform, (batch_size,), position, seed=seed, **kwargs)

        if labels is None:
            indices = uniform(index_seed, minval=0, maxval=self.size, dtype=tf.int32)
        else:
            if self.num_classes is None:
                raise ValueError("Class-conditional draws need a ReplayBuffer built with `num_classes`.")
            slot = self.slots_per_class
            indices = tf.cast(labels, tf.int32) * slot + uniform(index_seed, minval=0, maxval=slot, dtype=tf.int32)
        x = tf.gather(self.samples.value, indices)
        if self.storage != "float32":  # dequantisation noise, uniform within each level
            x = self._decode(x, replica_random(tf.random.stateless_uniform, tf.shape(x), position,
                                               seed=dequantize_seed))
        restarted = uniform(restart_seed) < self.restart_prob
        noise = self.fresh_chains(batch_size, noise_seed, labels=labels, position=position)
        mask = tf.reshape(restarted, [-1] + [1] * len(self.image_shape))
        x = tf.where(mask, noise, x)
        return BufferDraw(x=x, indices=indices, restarted=restarted)

    def update(self, indices: tf.Tensor, samples: tf.Tensor, keep: Optional[tf.Tensor] = None) -> None:
        """Writes ``samples`` back to the slots ``indices`` in place (a scatter update).

        ``keep``: optional bool ``[batch]``; rows where it is False write nothing (e.g. the class-conditional chains
        of unlabelled rows, whose label is a placeholder). Shapes stay static: such a row repeats the write of the
        first kept row (the same slot and value), or rewrites its slot's stored value when no row is kept.

        Under a ``tf.distribute`` strategy every replica all-gathers every replica's
        ``(indices, samples)`` and applies the same scatter, so all copies stay identical and hold
        every replica's chains (see the class docstring).
        """
        if keep is None:
            indices, samples = all_gather_rows(tf.cast(indices, tf.int32), tf.cast(samples, tf.float32))
            self.samples.value.scatter_update(tf.IndexedSlices(self._encode(samples), indices))
            return
        indices, samples, keep = all_gather_rows(tf.cast(indices, tf.int32), tf.cast(samples, tf.float32),
                                                 tf.cast(keep, tf.int32))
        keep = keep > 0
        encoded = self._encode(samples)
        first = tf.argmax(tf.cast(keep, tf.int32), output_type=tf.int32)  # the first kept row (0 when none)
        any_kept = tf.reduce_any(keep)
        stored = tf.gather(self.samples.value, indices)  # what the slots hold (for when no row is kept)
        fallback_indices = tf.where(any_kept, tf.fill(tf.shape(indices), indices[first]), indices)
        fallback_values = tf.where(any_kept, tf.broadcast_to(encoded[first], tf.shape(encoded)), stored)
        row_mask = tf.reshape(keep, [-1] + [1] * len(self.image_shape))
        self.samples.value.scatter_update(tf.IndexedSlices(tf.where(row_mask, encoded, fallback_values),
                                                           tf.where(keep, indices, fallback_indices)))

    def reset(self, seed) -> None:
        """Refills the whole buffer from the start distribution (e.g. after divergence)."""
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
        self.samples.assign(self._encode(self._init_fill(self.size, seed)))

    def call(self, inputs=None):
        raise NotImplementedError("ReplayBuffer is not called; use `draw` and `update`.")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "image_shape": list(self.image_shape),
                "size": self.size,
                "restart_prob": self.restart_prob,
                "num_classes": self.num_classes,
                "value_range": list(self.value_range),
                "seed": self.seed,
                "storage": self.storage,
                "init": None if self.init is None else keras.saving.serialize_keras_object(self.init),
                "uniform_fraction": self.uniform_fraction,
                "flat_fraction": self.flat_fraction,
            }
        )
        return config
