"""jem_tf.training.stability: the StabilityGuard's divergence detection and rollback."""

import keras
import numpy as np
import pytest
from conftest import tiny_jem

from jem_tf import JEM, SGLDSampler, small_cnn
from jem_tf.data import load_digits
from jem_tf.training.schedules import ScaledSchedule, WarmupPiecewiseSchedule
from jem_tf.training.stability import StabilityGuard, TrainingDiverged


class PoisonWeights(keras.callbacks.Callback):
    """Test hook: sets the first kernel to NaN after the given optimizer steps (a blown-up update), once
    per step unless ``repeat`` (a rollback rewinds the step counter)."""

    def __init__(self, steps, repeat=False):
        super().__init__()
        self.steps = set(steps)
        self.repeat = repeat

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step in self.steps:
            if not self.repeat:
                self.steps.discard(step)
            kernel = self.model.backbone.trainable_variables[0]
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))


def _digits_jem(seed=0):
    model = JEM(small_cnn(num_classes=10, input_shape=(8, 8, 1), width=8, seed=seed),
                sampler=SGLDSampler(n_steps=5), buffer_size=500, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(WarmupPiecewiseSchedule(3e-3, warmup_steps=10)))
    return model


@pytest.mark.integration
def test_nan_divergence_is_rolled_back_and_training_recovers():
    data = load_digits(seed=0)
    x, y = data.x_train[:600], data.y_train[:600]
    clean = _digits_jem()
    clean.fit(x, y, batch_size=32, epochs=8, verbose=0, shuffle=False)
    clean_accuracy = clean.evaluate(data.x_test, data.y_test, return_dict=True, verbose=0)["accuracy"]

    messages = []
    # lr_factor 1: the recovered run differs from the clean one only by the rollback and the reseed.
    guard = StabilityGuard(snapshot_every_steps=10, lr_factor=1.0, log=messages.append)
    model = _digits_jem()
    # The poison hook runs before the guard: step 60's update "explodes", step 61's loss is NaN.
    model.fit(x, y, batch_size=32, epochs=8, verbose=0, shuffle=False, callbacks=[PoisonWeights({60}), guard])
    guard.raise_if_failed()
    assert len(guard.rollbacks) == 1
    event = guard.rollbacks[0]
    assert event["step"] == 61 and "not finite" in event["reason"] and event["restored_step"] <= 60
    assert event["reseeds"] == 1 and int(model.seed_state.reseeds.numpy()) == 1
    assert any("Rolled back" in m for m in messages)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    accuracy = model.evaluate(data.x_test, data.y_test, return_dict=True, verbose=0)["accuracy"]
    # Measured: clean 0.806, recovered 0.828 (seed 0; with lr_factor 0.5: 0.747). Comparable: within 0.1
    # and far above chance (0.1).
    assert accuracy > 0.7 and abs(accuracy - clean_accuracy) < 0.1, (accuracy, clean_accuracy)


@pytest.mark.integration
def test_guard_gives_up_after_max_rollbacks(tiny_data):
    x, y = tiny_data
    model = tiny_jem()
    guard = StabilityGuard(max_rollbacks=2, snapshot_every_steps=1, log=lambda m: None)
    poison = PoisonWeights(range(1, 100), repeat=True)  # every update explodes
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[poison, guard])
    assert len(guard.rollbacks) == 2 and model.stop_training
    with pytest.raises(TrainingDiverged, match="2 rollback"):
        guard.raise_if_failed()


def test_guard_bounds(tiny_data):
    model = tiny_jem()
    guard = StabilityGuard(max_abs_energy=100, max_energy_gap=10, max_sample_abs=3)
    guard.set_model(model)
    assert guard.diagnose({"loss": 1.0, "e_data": -5.0, "e_sample": -4.0, "energy_gap": -1.0,
                           "sample_abs_max": 1.2}) is None
    assert "loss is not finite" in guard.diagnose({"loss": float("nan")})
    assert "|e_sample| = 500" in guard.diagnose({"e_sample": -500.0})
    assert "max_energy_gap" in guard.diagnose({"energy_gap": 20.0})
    assert "left the data range" in guard.diagnose({"sample_abs_max": 4.0})
    default = StabilityGuard()  # sample bound: 10x the data range's largest magnitude, here 10
    default.set_model(model)
    assert default.diagnose({"sample_abs_max": 9.0}) is None
    assert "> 10" in default.diagnose({"sample_abs_max": 11.0})
    with pytest.raises(ValueError, match="lr_factor"):
        StabilityGuard(lr_factor=0)


@pytest.mark.integration
def test_guard_can_add_sgld_steps_and_reset_buffer(tiny_data):
    x, y = tiny_data
    model = tiny_jem()
    guard = StabilityGuard(snapshot_every_steps=1, lr_factor=0.5, extra_sgld_steps=5, reset_buffer=True,
                           log=lambda m: None)
    model.replay_buffer.samples.assign(np.full(model.replay_buffer.samples.shape, 0.5, "float32"))
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[PoisonWeights({2}), guard])
    assert len(guard.rollbacks) == 1 and guard.rollbacks[0]["sgld_steps"] == 8
    assert model.sampler.n_steps == 8
    # tiny_jem's Adam(1e-3) has a plain rate: halved in place.
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(5e-4)
    assert not np.any(model.replay_buffer.samples.numpy() == 0.5)  # refilled with noise, then trained


@pytest.mark.integration
def test_rollback_scales_a_learning_rate_schedule_and_keeps_training(tiny_data):
    x, y = tiny_data
    model = tiny_jem()
    model.compile(optimizer=keras.optimizers.Adam(WarmupPiecewiseSchedule(1e-3, warmup_steps=4)))
    guard = StabilityGuard(snapshot_every_steps=1, log=lambda m: None)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[PoisonWeights({2}), guard])
    assert len(guard.rollbacks) == 1
    schedule = model.optimizer._learning_rate
    assert isinstance(schedule, ScaledSchedule) and schedule.factor == 0.5
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(0.5e-3)  # past warm-up
    # 6 batches; the poisoned step 2 was never snapshotted, so step 3 rolled back to step 1: 1 + 3 more.
    assert int(model.optimizer.iterations.numpy()) == 4
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
