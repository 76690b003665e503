"""Divergence detection and automatic rollback for JEM training.

JEM training is notoriously unstable: the loss or the energies blow up, or the SGLD samples run away
from the data range, often after hours of training. The reference code crashes on purpose and its
authors restarted runs by hand from the last checkpoint with a new seed. :class:`StabilityGuard`
does that automatically, inside ``fit``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from jem_tf.keras_workarounds import learning_rate_or_schedule
from jem_tf.seeds import buffer_reset_seed
from jem_tf.training.schedules import ScaledSchedule


class TrainingDiverged(RuntimeError):
    """Raised by :meth:`StabilityGuard.raise_if_failed` when training diverged more often than allowed."""


def _scalar(value) -> float:
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


class StabilityGuard(keras.callbacks.Callback):
    """Detects divergence and rolls training back to the last good state.

    After every batch the guard checks the step logs: a non-finite loss or metric, ``|e_data|`` or
    ``|e_sample|`` above ``max_abs_energy``, ``|energy_gap|`` above ``max_energy_gap``, or SGLD samples
    whose largest ``|x|`` exceeds ``max_sample_abs``. It keeps an in-memory snapshot of the last good
    state (all model variables: weights, replay buffer, seed state; and the optimizer's slots and step
    counter), refreshed every ``snapshot_every_steps`` steps and at each epoch end once the weights are
    checked finite. On divergence it restores the snapshot, moves the sampler onto fresh random numbers
    (:meth:`JEM.reseed`), optionally multiplies the learning rate by ``lr_factor``, adds
    ``extra_sgld_steps`` SGLD steps and refills the replay buffer with noise, resets the epoch's
    metrics and carries on. After ``max_rollbacks`` rollbacks it stops training with a clear message
    (see :meth:`raise_if_failed`). Every rollback is logged and written to TensorBoard
    (``stability/rollbacks``) when ``log_dir`` is set.

    Args:
        max_abs_energy: Bound on the mean energies' magnitude. Default 1e4.
        max_energy_gap: Bound on ``|mean E(data) - mean E(samples)|``. Default 1e3.
        max_sample_abs: Bound on the samples' largest ``|x|``. Default: 10x the data range's largest
            magnitude.
        max_rollbacks: Rollbacks allowed before stopping. Default 3.
        snapshot_every_steps: Steps between snapshots. Default 50.
        lr_factor: Learning-rate multiplier applied at each rollback (1.0: unchanged). Default 0.5.
        extra_sgld_steps: SGLD steps added at each rollback. Default 0.
        reset_buffer: Refill the replay buffer with uniform noise at each rollback. Default False.
        log_dir: TensorBoard directory for rollback events (optional).
        log: Callable for messages (default ``print``).

    Example:
        >>> guard = StabilityGuard(max_rollbacks=3, lr_factor=0.5)
        >>> model.fit(dataset, epochs=10, callbacks=[guard])
        >>> guard.raise_if_failed()
    """

    def __init__(self, *, max_abs_energy: float = 1e4, max_energy_gap: float = 1e3,
                 max_sample_abs: Optional[float] = None, max_rollbacks: int = 3, snapshot_every_steps: int = 50,
                 lr_factor: float = 0.5, extra_sgld_steps: int = 0, reset_buffer: bool = False,
                 log_dir: Optional[str] = None, log: Callable[[str], None] = print):
        super().__init__()
        for name, value in (("max_abs_energy", max_abs_energy), ("max_energy_gap", max_energy_gap)):
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0; received {value!r}")
        if max_sample_abs is not None and not max_sample_abs > 0:
            raise ValueError(f"`max_sample_abs` must be None or > 0; received {max_sample_abs!r}")
        if not (isinstance(max_rollbacks, int) and max_rollbacks >= 0):
            raise ValueError(f"`max_rollbacks` must be an int >= 0; received {max_rollbacks!r}")
        if not (isinstance(snapshot_every_steps, int) and snapshot_every_steps >= 1):
            raise ValueError(f"`snapshot_every_steps` must be an int >= 1; received {snapshot_every_steps!r}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"`lr_factor` must be in (0, 1]; received {lr_factor!r}")
        if not (isinstance(extra_sgld_steps, int) and extra_sgld_steps >= 0):
            raise ValueError(f"`extra_sgld_steps` must be an int >= 0; received {extra_sgld_steps!r}")
        self.max_abs_energy = max_abs_energy
        self.max_energy_gap = max_energy_gap
        self.max_sample_abs = max_sample_abs
        self.max_rollbacks = max_rollbacks
        self.snapshot_every_steps = snapshot_every_steps
        self.lr_factor = lr_factor
        self.extra_sgld_steps = extra_sgld_steps
        self.reset_buffer = reset_buffer
        self.log_dir = log_dir
        self.log = log
        self.rollbacks = []  # one dict per rollback: step, reason, ...
        self.failure: Optional[str] = None
        self._snapshot = None
        self._steps_since_snapshot = 0
        self._writer = None

    # ------------------------------------------------------------------------------------ checks
    def _sample_bound(self) -> float:
        if self.max_sample_abs is not None:
            return self.max_sample_abs
        return 10.0 * max(abs(v) for v in self.model.value_range)

    def diagnose(self, logs) -> Optional[str]:
        """The reason the step ``logs`` show divergence, or ``None``."""
        logs = logs or {}
        for name, value in logs.items():
            if not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
                return f"{name} is not finite ({_scalar(value)})"
        for name in ("e_data", "e_sample"):
            if name in logs and abs(_scalar(logs[name])) > self.max_abs_energy:
                return f"|{name}| = {abs(_scalar(logs[name])):.4g} > max_abs_energy = {self.max_abs_energy:g}"
        if "energy_gap" in logs and abs(_scalar(logs["energy_gap"])) > self.max_energy_gap:
            return (f"|energy_gap| = {abs(_scalar(logs['energy_gap'])):.4g} > "
                    f"max_energy_gap = {self.max_energy_gap:g}")
        if "sample_abs_max" in logs and _scalar(logs["sample_abs_max"]) > self._sample_bound():
            return (f"SGLD samples left the data range: max |x| = {_scalar(logs['sample_abs_max']):.4g} > "
                    f"{self._sample_bound():g}")
        return None

    def _weights_finite(self) -> bool:
        return all(bool(tf.reduce_all(tf.math.is_finite(v.value)).numpy())
                   for v in self.model.trainable_variables)

    # ------------------------------------------------------------------------------------ state
    def _state_variables(self):
        return list(self.model.variables) + list(self.model.optimizer.variables)

    def snapshot(self) -> None:
        """Copies the current training state to host memory."""
        self._snapshot = [np.array(v.numpy()) for v in self._state_variables()]
        self._steps_since_snapshot = 0

    def _restore(self) -> None:
        for variable, value in zip(self._state_variables(), self._snapshot):
            variable.assign(value)

    def _lower_learning_rate(self) -> Optional[float]:
        # A LossScaleOptimizer (mixed_float16) keeps the schedule on its inner optimizer.
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        current = learning_rate_or_schedule(optimizer)  # the schedule or variable itself, not its current value
        if isinstance(current, keras.optimizers.schedules.LearningRateSchedule):
            optimizer.learning_rate = ScaledSchedule(current, self.lr_factor)
        else:
            optimizer.learning_rate = float(optimizer.learning_rate.numpy()) * self.lr_factor
        return float(np.asarray(optimizer.learning_rate))

    def _rollback(self, reason: str, step: int) -> None:
        if self._snapshot is None or len(self.rollbacks) >= self.max_rollbacks:
            self.failure = (f"training diverged at step {step} ({reason}) and {len(self.rollbacks)} rollback(s) "
                            f"did not help (max_rollbacks={self.max_rollbacks}); stopping. Try a lower "
                            "learning rate, more SGLD steps or energy_l2_weight > 0.")
            self.log("StabilityGuard: " + self.failure)
            self.model.stop_training = True
            return
        self._restore()
        event = {"step": step, "reason": reason, "restored_step": int(self.model.optimizer.iterations.numpy()),
                 "reseeds": self.model.reseed()}
        retrace = False
        if self.lr_factor < 1.0:
            event["learning_rate"] = self._lower_learning_rate()
            retrace = True
        if self.extra_sgld_steps:
            self.model.sampler.n_steps += self.extra_sgld_steps
            event["sgld_steps"] = self.model.sampler.n_steps
            retrace = True
        if self.reset_buffer:
            self.model.replay_buffer.reset(seed=buffer_reset_seed(self.model.seed, event["reseeds"]))
            event["buffer_reset"] = True
        self.model.reset_metrics()
        if retrace:  # the compiled step captured the old schedule / step count
            self.model.make_train_function(force=True)
        self.rollbacks.append(event)
        details = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("step", "reason"))
        self.log(f"StabilityGuard: divergence at step {step}: {reason}. Rolled back "
                 f"({len(self.rollbacks)}/{self.max_rollbacks}): {details}.")
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "stability"))
            with self._writer.as_default():
                tf.summary.scalar("stability/rollbacks", len(self.rollbacks), step=step)
                tf.summary.text("stability/rollback", f"{reason} -> {details}", step=step)
            self._writer.flush()

    # ------------------------------------------------------------------------------------ hooks
    def on_train_begin(self, logs=None):
        self.snapshot()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        reason = self.diagnose(logs)
        if reason is not None:
            self._rollback(reason, step)
            return
        self._steps_since_snapshot += 1
        if self._steps_since_snapshot >= self.snapshot_every_steps and self._weights_finite():
            self.snapshot()

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:
            return
        train_logs = {k: v for k, v in (logs or {}).items() if not k.startswith("val_")}
        reason = self.diagnose(train_logs) or (None if self._weights_finite() else "weights are not finite")
        if reason is not None:
            self._rollback(reason, int(self.model.optimizer.iterations.numpy()))
        else:
            self.snapshot()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def raise_if_failed(self) -> None:
        """Raises :class:`TrainingDiverged` if the guard stopped training."""
        if self.failure is not None:
            raise TrainingDiverged(self.failure)
