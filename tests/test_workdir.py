"""jem_tf.run.workdir: a work directory's layout and the run files read back from it."""

import json
import os

import pytest

from jem_tf.run.workdir import RunLayout, load_run_metrics


def test_layout_names_every_file_of_a_work_directory(tmp_path):
    layout = RunLayout(str(tmp_path))
    paths = (layout.model, layout.config, layout.metrics, layout.samples, layout.checkpoints, layout.logs,
             layout.backup, layout.precision)
    assert [os.path.relpath(p, tmp_path) for p in paths] == \
        ["model.keras", "config.json", "metrics.json", "samples.png", "checkpoints", "logs", "backup", "precision.json"]


def test_load_run_metrics_reads_a_finished_run_and_names_a_bad_file(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    assert load_run_metrics(layout.workdir) is None  # no run, or one that has not finished
    os.makedirs(layout.workdir)
    with open(layout.metrics, "w") as f:
        json.dump({"test_accuracy": 0.5, "train_seconds": 12.0}, f)
    assert load_run_metrics(layout.workdir) == {"test_accuracy": 0.5, "train_seconds": 12.0}
    for text in ("[1, 2]", "{broken"):
        with open(layout.metrics, "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match="metrics.json is not a valid metrics file"):
            load_run_metrics(layout.workdir)
