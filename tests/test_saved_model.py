"""jem_tf.serving.saved_model: an export's layout, metadata, versions and temporaries."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import ood_scores as _ood_scores
from conftest import tiny_jem

from jem_tf.serving import METADATA_FILE, export_saved_model, next_version


@pytest.fixture(scope="module")
def trained(tiny_export):
    """The tiny trained model these tests share: conftest's ``tiny_export``, trained once per test run."""
    return tiny_export


def test_layout_metadata_and_small_size(trained):
    model, x, base, path = trained
    assert path == os.path.join(base, "1") and sorted(os.listdir(base)) == ["1"]
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    metadata = json.load(open(os.path.join(path, METADATA_FILE)))
    assert metadata["input"] == {"name": "images", "dtype": "float32", "shape": [None, 8, 8, 1],
                                 "value_range": [-1.0, 1.0], "preprocessing": "test"}
    assert metadata["sample"]["max_num_samples"] == 32 and metadata["sample"]["max_n_steps"] == 250
    # Default step/noise bounds of the trained sampler (step 1.0, noise 0.01): 10x the step, the range's width 2.
    assert metadata["sample"]["max_step_size"] == 10.0 and metadata["sample"]["max_noise_std"] == 2.0
    assert metadata["sample"]["clipped_to_value_range"] is True
    # The OOD detector: chosen on the calibration images and outliers made from them, calibrated at 95 % TPR.
    ood = metadata["ood"]
    assert ood["calibration_split"] == "given" and ood["num_calibration_images"] == len(x)
    assert ood["score"] == ood["selection"]["chosen"] and ood["threshold"] == ood["detector"]["threshold"]
    scores = _ood_scores(model, metadata, x)
    assert np.mean(scores >= ood["threshold"]) == pytest.approx(ood["achieved_tpr"])
    assert 0.95 <= ood["achieved_tpr"] < 0.95 + 1 / len(x)  # at least 95 % pass, not one image more than needed
    # No replay buffer or optimizer state, and each backbone variable stored once.
    data = [f for f in os.listdir(os.path.join(path, "variables")) if f.startswith("variables.data")]
    stored = sum(os.path.getsize(os.path.join(path, "variables", f)) for f in data)
    weight_bytes = 4 * model.backbone.count_params()
    assert weight_bytes <= stored < 1.2 * weight_bytes + 4096
    assert model.replay_buffer.samples.numpy().nbytes > 3 * stored  # the buffer alone would dwarf it


def test_versions_are_never_overwritten_and_increment(trained):
    model, x, base, _ = trained
    with pytest.raises(ValueError, match="already exists"):
        export_saved_model(model, base, version=1, ood_threshold=0.0)
    assert next_version(base) == 2
    with pytest.raises(ValueError, match="exactly one"):
        export_saved_model(model, base)


@pytest.mark.integration  # two whole exports: about 1 s on an idle 2-core machine, past 2 s in a full run
def test_two_exports_at_once_never_collide(trained, tmp_path, monkeypatch):
    """Another export writes the chosen version between the check and the rename: the next free version is taken
    (its metadata says which), or, for a version asked for, one error; nothing is overwritten or left behind."""
    from jem_tf.serving import saved_model

    model, _, _, _ = trained
    base = str(tmp_path / "served")
    real_write = saved_model.write_atomically
    raced = []

    def racing_write(path, write, **kwargs):
        if not raced:  # the other export finishes first, once
            raced.append(path)
            os.makedirs(path)
            open(os.path.join(path, "saved_model.pb"), "wb").write(b"the other export's")
        return real_write(path, write, **kwargs)

    monkeypatch.setattr(saved_model, "write_atomically", racing_write)
    path = export_saved_model(model, base, ood_threshold=0.0)
    assert path == os.path.join(base, "2")
    assert json.load(open(os.path.join(path, "assets.extra", "jem_metadata.json")))["version"] == 2
    assert open(os.path.join(base, "1", "saved_model.pb"), "rb").read() == b"the other export's"
    raced.clear()
    with pytest.raises(ValueError, match="Version 7 .* was written by another export at the same time"):
        export_saved_model(model, base, version=7, ood_threshold=0.0)
    assert sorted(os.listdir(base)) == ["1", "2", "7"]  # only the other export's 7: no temporary left


def test_exports_remove_the_temporaries_of_killed_exports_only(export):
    export_dir, path, kept = export
    assert sorted(os.listdir(export_dir)) == sorted(["1"] + kept) and path == str(export_dir / "1")


@pytest.mark.integration
def test_an_export_serves_a_detector_of_the_source_classifier(tiny_data, tmp_path):
    """A converted model's export whose detector is its classifier's own serves that network's scores."""
    import dataclasses

    from jem_tf import small_cnn
    from jem_tf.ood import default_candidates, fit_ood_detector

    x, y = tiny_data
    model = tiny_jem()
    source_net = small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1, seed=7)
    fitted = fit_ood_detector(model, x[:48], calibration_split="validation", calibration_labels=y[:48],
                              train_images=x[48:], train_labels=y[48:], source_network=source_net)
    candidate = {c.name: c for c in default_candidates(fitted.scorer.available)}["source_mahalanobis"]
    components = fitted.scorer.arrays(x[:48], candidate.components)
    detector = candidate.fitted(components)
    detector = detector.with_threshold(detector.combine(components))
    path = export_saved_model(model, str(tmp_path / "export"),
                              ood=dataclasses.replace(fitted, detector=detector))
    served = tf.saved_model.load(path).signatures["energy"](images=tf.constant(x[:8]))
    expected = detector.combine(fitted.scorer.arrays(x[:8], detector.components))
    np.testing.assert_allclose(served["ood_score"].numpy(), expected, rtol=1e-4)
    metadata = json.load(open(os.path.join(path, "assets.extra", "jem_metadata.json")))
    assert metadata["ood"]["score"] == "source_mahalanobis" and "source" in metadata["ood"]["parameters"]
