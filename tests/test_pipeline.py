"""jem_tf.training.pipeline: train_and_evaluate, and a run's precision probed once."""

import json
import os

import pytest

from jem_tf.run.config import TrainConfig, load_recipe
from jem_tf.run.workdir import RunLayout
from jem_tf.training.pipeline import train_and_evaluate


def test_auto_precision_is_probed_once_per_run_and_reused_on_resume(tmp_path):
    from jem_tf.training.pipeline import resolve_run_precision

    layout = RunLayout(str(tmp_path))
    config = TrainConfig(precision="auto", width=4)
    messages = []
    resolved, report = resolve_run_precision(config, layout, image_shape=(8, 8, 1), num_classes=10, batch_size=8,
                                             log=messages.append)
    assert resolved.precision in ("float32", "mixed_bfloat16") and "measured probe" in report["reason"]
    with open(layout.precision) as f:
        assert json.load(f)["precision"] == resolved.precision
    # A resumed run (a backup exists) takes the recorded choice without probing, whatever it was.
    recorded = {"precision": "mixed_bfloat16", "reason": "probe said so"}
    with open(layout.precision, "w") as f:
        json.dump(recorded, f)
    os.makedirs(layout.backup)
    messages.clear()
    resolved, report = resolve_run_precision(config, layout, image_shape=(8, 8, 1), num_classes=10, batch_size=8,
                                             log=messages.append)
    assert resolved.precision == "mixed_bfloat16" and "reused on resume" in report["reason"]
    assert messages == ["precision auto -> mixed_bfloat16: the choice of the run being resumed"]
    # An explicit precision is never replaced.
    assert resolve_run_precision(config.replace(precision="float32"), layout, image_shape=(8, 8, 1), num_classes=10,
                                 batch_size=8)[0].precision == "float32"


@pytest.mark.slow
def test_default_digits_recipe_reaches_95_percent_and_fits_p_x(tmp_path):
    metrics = train_and_evaluate(load_recipe("digits"), str(tmp_path), verbose=0)
    assert metrics["test_accuracy"] >= 0.95
    # The contrastive term keeps the replay buffer's energy near that of real data (measured -0.147 vs -0.129;
    # a plain classifier's data energy drifts to about -30).
    assert abs(metrics["buffer_energy_mean"] - metrics["test_energy_mean"]) < 1.0
    assert metrics["train_seconds"] < 600
