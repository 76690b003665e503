"""The exported signatures' bounds (issue 23): ``classify`` and ``energy`` take at most ``max_batch_size`` images
per request, checked in-graph like ``sample``'s bounds; and an export cleans up what killed exports left."""

import json
import os
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from jem_tf import JEM, SGLDSampler, small_cnn
from jem_tf.serving import DEFAULT_MAX_BATCH_SIZE, METADATA_FILE, export_saved_model


def _tiny_jem():
    model = JEM(small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1), sampler=SGLDSampler(n_steps=1),
                buffer_size=16)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """One export (max_batch_size 4) into a directory that holds the temporaries of killed exports."""
    export_dir = tmp_path_factory.mktemp("served")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that no longer runs
    host = os.uname().nodename
    stale = [f".tmp-3-{gone.pid}", f".tmp-export-{host}-{gone.pid}", f".3.tmp-{host}-{gone.pid}"]  # old names, ours
    kept = [f".3.tmp-{host}-{os.getppid()}", f".tmp-export-{host}-{os.getppid()}",  # live processes'
            f".3.tmp-elsewhere.example-{gone.pid}", f".tmp-export-elsewhere.example-{gone.pid}"]  # another host's
    for name in stale + kept:
        os.makedirs(export_dir / name / "variables")
    path = export_saved_model(_tiny_jem(), str(export_dir), ood_threshold=0.0, max_batch_size=4)
    return export_dir, path, kept


def test_exports_remove_the_temporaries_of_killed_exports_only(export):
    export_dir, path, kept = export
    assert sorted(os.listdir(export_dir)) == sorted(["1"] + kept) and path == str(export_dir / "1")


def test_classify_and_energy_refuse_batches_above_max_batch_size_in_graph(export):
    _, path, _ = export
    metadata = json.load(open(os.path.join(path, METADATA_FILE)))
    assert metadata["max_batch_size"] == 4
    served = tf.saved_model.load(path)
    images = tf.zeros((4, 8, 8, 1))
    assert served.signatures["classify"](images=images)["logits"].shape == (4, 3)
    assert served.signatures["energy"](images=images)["energy"].shape == (4,)
    for name in ("classify", "energy", "serving_default"):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"at most max_batch_size = 4 images"):
            served.signatures[name](images=tf.zeros((5, 8, 8, 1)))


@pytest.mark.parametrize("value", [0, -1, True, 1.5, 10 ** 9])
def test_max_batch_size_is_checked_before_anything_is_written(value, tmp_path):
    with pytest.raises(ValueError, match=r"`max_batch_size` must be an int in \[1, 4194304\] for images of shape "
                                         r"\[8, 8, 1\]"):
        export_saved_model(_tiny_jem(), str(tmp_path / "served"), ood_threshold=0.0, max_batch_size=value)
    assert not (tmp_path / "served").exists()
    assert DEFAULT_MAX_BATCH_SIZE == 1024
