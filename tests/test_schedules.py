"""jem_tf.training.schedules: the warm-up schedule and its scaled copy after a rollback."""


import keras
import numpy as np
import pytest

from jem_tf import WarmupPiecewiseSchedule
from jem_tf.training.schedules import ScaledSchedule


def test_linear_warmup_then_step_decay():
    schedule = WarmupPiecewiseSchedule(1e-3, warmup_steps=10, decay_boundaries=[100, 200], decay_rate=0.3)
    lrs = [float(schedule(s)) for s in (0, 4, 9, 50, 99, 100, 199, 200)]
    np.testing.assert_allclose(lrs, [1e-4, 5e-4, 1e-3, 1e-3, 1e-3, 3e-4, 3e-4, 9e-5], rtol=1e-5)


def test_serializable_inside_optimizer():
    schedule = WarmupPiecewiseSchedule(1e-3, warmup_steps=5, decay_boundaries=[7])
    optimizer = keras.optimizers.Adam(schedule)
    again = keras.optimizers.Adam.from_config(optimizer.get_config())
    assert isinstance(again.learning_rate, WarmupPiecewiseSchedule) or again.get_config() == optimizer.get_config()
    assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule)).get_config() == \
        schedule.get_config()


@pytest.mark.parametrize("kwargs", [{"learning_rate": 0}, {"learning_rate": 1, "warmup_steps": -1},
                                    {"learning_rate": 1, "decay_boundaries": [5, 2]}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        WarmupPiecewiseSchedule(**kwargs)


def test_scaled_schedule_round_trips():
    schedule = ScaledSchedule(ScaledSchedule(WarmupPiecewiseSchedule(1e-3), 0.5), 0.5)
    assert schedule.factor == 0.25 and float(schedule(100)) == pytest.approx(2.5e-4)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert again.get_config() == schedule.get_config()
