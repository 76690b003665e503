"""Learning-rate schedules. The step counter is the optimizer's ``iterations``, which is saved
with the optimizer, so a resumed run continues its warm-up and decay where it stopped."""

from __future__ import annotations

from typing import Sequence, Union

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="jem_tf")
class WarmupPiecewiseSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``learning_rate``, then multiply by ``decay_rate`` at each boundary.

    ``lr(step) = learning_rate * min(1, (step + 1) / warmup_steps) * decay_rate ** k`` where ``k`` is
    the number of ``decay_boundaries`` (in optimizer steps) that ``step`` has reached.

    Args:
        learning_rate: Peak learning rate.
        warmup_steps: Warm-up length in optimizer steps; 0 disables warm-up. Default 0.
        decay_boundaries: Optimizer steps at which the rate is multiplied by ``decay_rate``.
        decay_rate: Multiplier per boundary. Default 0.3 (the JEM reference).

    Example:
        >>> schedule = WarmupPiecewiseSchedule(1e-4, warmup_steps=1000, decay_boundaries=[10_000])
        >>> optimizer = keras.optimizers.Adam(learning_rate=schedule)
    """

    def __init__(
        self,
        learning_rate: float,
        warmup_steps: int = 0,
        decay_boundaries: Sequence[int] = (),
        decay_rate: float = 0.3,
    ):
        if not learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0; received {learning_rate!r}")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"`warmup_steps` must be an int >= 0; received {warmup_steps!r}")
        boundaries = [int(b) for b in decay_boundaries]
        if boundaries != sorted(boundaries) or any(b < 0 for b in boundaries):
            raise ValueError(f"`decay_boundaries` must be increasing and >= 0; received {decay_boundaries!r}")
        if not decay_rate > 0:
            raise ValueError(f"`decay_rate` must be > 0; received {decay_rate!r}")
        self.learning_rate = float(learning_rate)
        self.warmup_steps = warmup_steps
        self.decay_boundaries = boundaries
        self.decay_rate = float(decay_rate)

    def __call__(self, step: Union[int, tf.Tensor]) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.learning_rate, tf.float32)
        if self.warmup_steps > 0:
            # Linear warm-up: the first update uses lr / warmup_steps, step warmup_steps-1 the full lr.
            lr = lr * tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        if self.decay_boundaries:
            passed = tf.reduce_sum(tf.cast(step >= tf.constant(self.decay_boundaries, tf.float32), tf.float32))
            lr = lr * tf.pow(self.decay_rate, passed)
        return lr

    def get_config(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "decay_boundaries": list(self.decay_boundaries),
            "decay_rate": self.decay_rate,
        }


@keras.saving.register_keras_serializable(package="jem_tf")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``factor * schedule(step)``: how :class:`jem_tf.training.stability.StabilityGuard` lowers the learning
    rate of a scheduled optimizer after a divergence (saved with the optimizer, so a resumed run keeps
    the lowered rate).

    Args:
        schedule: A ``LearningRateSchedule`` (or its serialized config).
        factor: Multiplier, > 0.
    """

    def __init__(self, schedule, factor: float):
        if isinstance(schedule, dict):
            schedule = keras.saving.deserialize_keras_object(schedule)
        if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(f"`schedule` must be a LearningRateSchedule; received {schedule!r}")
        if not factor > 0:
            raise ValueError(f"`factor` must be > 0; received {factor!r}")
        if isinstance(schedule, ScaledSchedule):  # keep one level: scale the inner schedule
            schedule, factor = schedule.schedule, schedule.factor * factor
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step):
        return self.factor * tf.cast(self.schedule(step), tf.float32)

    def get_config(self) -> dict:
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "factor": self.factor}
