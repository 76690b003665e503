"""jem_tf.serving.limits: an export's sample and batch bounds, checked when exporting and in the graph."""

import json
import os
import re
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import SAMPLE_REQUEST
from conftest import serving_jem as _tiny_jem

from jem_tf.serving import (
    DEFAULT_MAX_BATCH_SIZE,
    METADATA_FILE,
    export_saved_model,
    max_num_samples_limit,
    sample_limits,
)


@pytest.fixture(scope="module")
def trained(tiny_export):
    """The tiny trained model these tests share: conftest's ``tiny_export``, trained once per test run."""
    return tiny_export


def test_sample_rejects_step_size_and_noise_std_above_the_export_limits(loaded):
    sample = loaded.signatures["sample"]
    ok = {k: tf.constant(v) for k, v in SAMPLE_REQUEST.items()}
    for name, value, message in [("step_size", 1e30, "step_size must be <= max_step_size = 10.0"),
                                 ("step_size", 10.5, "step_size must be <= max_step_size = 10.0"),
                                 ("step_size", np.inf, "step_size must be"),
                                 ("noise_std", 1e30, "noise_std must be <= max_noise_std = 2.0"),
                                 ("noise_std", 2.5, "noise_std must be <= max_noise_std = 2.0"),
                                 ("noise_std", np.nan, "noise_std must be")]:
        start = time.time()
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            sample(**{**ok, name: tf.constant(value, tf.float32), "n_steps": tf.constant(250)})
        assert time.time() - start < 5  # rejected before any sampling
    at_limits = sample(**{**ok, "step_size": tf.constant(10.0), "noise_std": tf.constant(2.0)})
    assert np.all(np.isfinite(at_limits["samples"].numpy()))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_step_size": 0.0}, "`max_step_size` must be finite (as float32) and > 0; received 0.0"),
    ({"max_step_size": -1.0}, "`max_step_size` must be finite (as float32) and > 0; received -1.0"),
    ({"max_step_size": float("inf")}, "`max_step_size` must be finite (as float32) and > 0; received inf"),
    ({"max_step_size": float("nan")}, "`max_step_size` must be finite (as float32) and > 0; received nan"),
    ({"max_step_size": 1e39}, "`max_step_size` must be finite (as float32) and > 0; received 1e+39"),
    ({"max_step_size": "10"}, "`max_step_size` must be a number; received '10'"),
    ({"max_step_size": 0.5}, "`max_step_size` must be >= the trained sampler's step_size 1.0"),
    ({"max_noise_std": float("nan")}, "`max_noise_std` must be finite (as float32) and > 0; received nan"),
    ({"max_noise_std": 0.001}, "`max_noise_std` must be >= the trained sampler's noise_std 0.01"),
    ({"max_num_samples": 0}, "`max_num_samples` must be an int >= 1; received 0"),
    ({"max_num_samples": 4194305}, "`max_num_samples` must be <= 4194304 for images of shape [8, 8, 1] (1 GiB"),
    ({"max_num_samples": 1_000_000_000}, "`max_num_samples` must be <= 4194304"),
    ({"max_n_steps": 100_001}, "`max_n_steps` must be an int in [1, 100000]; received 100001"),
    ({"max_n_steps": 0}, "`max_n_steps` must be an int in [1, 100000]; received 0"),
])
def test_export_rejects_bad_sample_limits_before_any_work(trained, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        export_saved_model(trained[0], str(tmp_path / "served"), ood_threshold=0.0, **kwargs)
    assert not (tmp_path / "served").exists()


def test_sample_limits_memory_cap_and_defaults(trained):
    model = trained[0]
    assert max_num_samples_limit((8, 8, 1)) == 2 ** 30 // 256 and max_num_samples_limit((32, 32, 3)) == 87381
    limits = sample_limits(model, max_num_samples=2 ** 30 // 256, max_n_steps=100_000)  # the ceilings themselves
    assert limits == {"max_num_samples": 4194304, "max_n_steps": 100_000, "max_step_size": 10.0, "max_noise_std": 2.0}
    assert sample_limits(model, max_step_size=1, max_noise_std=0.01)["max_step_size"] == 1.0


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
