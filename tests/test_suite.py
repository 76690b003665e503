"""jem_tf.evaluation.suite: every mode's files, report.json's schema, evaluate()'s checks."""

import json
import os

import numpy as np
import pytest

from jem_tf import evaluation as ev

SMALL = dict(refine_steps=(2,), sample_steps=3, num_samples=8, long_chain_steps=6, frechet_images=40,
             pgd_eps={"linf": (0.1,), "l2": (0.5,)}, pgd_steps=3, robustness_examples=24, robustness_refine_steps=2,
             batch_size=32)

# The report's schema: top-level keys and each mode's keys. Changing it means bumping SCHEMA_VERSION.
SCHEMA = {
    "accuracy": {"accuracy", "accuracy_after_refinement", "settings"},
    "calibration": {"uncalibrated", "temperature_scaled", "reliability_diagram",
                    "reliability_diagram_temperature_scaled", "settings"},
    "ood": {"metrics", "score_means", "histograms", "settings", "detector"},
    "samples": {"reference", "unconditional", "conditional_start", "conditional", "buffer", "long_chain", "settings"},
    "frechet": {"distances", "settings"},
    "robustness": {"clean", "linf_eps_0.1", "l2_eps_0.5", "settings"},
}


@pytest.fixture(scope="module")
def trained(evaluation_jem):
    """The tiny trained model these tests share: conftest's ``evaluation_jem``, trained once per test run."""
    return evaluation_jem


@pytest.mark.integration
def test_every_mode_writes_its_files_and_a_stable_report(trained, tmp_path):
    model, (x_train, y_train), (x_val, y_val), (x_test, y_test), path = trained
    ood = {name: ev.synthetic_ood_images(name, x_test, seed=1) for name in ev.SYNTHETIC_OOD}
    network = ev.load_feature_network(path, image_shape=model.image_shape)
    report = ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path), modes=ev.MODES,
                         val_images=x_val, val_labels=y_val, train_images=x_train, train_labels=y_train,
                         ood_sets=ood, feature_network=network, **SMALL)
    on_disk = json.load(open(tmp_path / ev.REPORT_FILE))
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk) == {"schema_version", "model", "settings", "timing_s", *ev.MODES}
    assert on_disk["schema_version"] == ev.SCHEMA_VERSION
    for mode, keys in SCHEMA.items():
        assert set(on_disk[mode]) == keys, mode
        assert on_disk["timing_s"][mode] >= 0
    assert on_disk["settings"]["transforms"] == ["none: inputs used as loaded (training-time data noise is off)"]

    # Accuracy agrees with Keras's own evaluation; refinement is recorded per step count.
    logits = model.predict(x_test, verbose=0)
    assert report["accuracy"]["accuracy"] == pytest.approx(float((logits.argmax(1) == y_test).mean()))
    assert set(report["accuracy"]["accuracy_after_refinement"]) == {"2"}
    calibration = report["calibration"]
    assert 0 <= calibration["uncalibrated"]["ece"] <= 1 and calibration["temperature_scaled"]["temperature"] > 0
    assert "validation" in calibration["settings"]["temperature_scaling"]
    # OOD: every score (alone and combined) against every set, in-distribution positive, metrics in range; the
    # detector the export would carry is chosen on validation data and reported like the others.
    assert set(report["ood"]["metrics"]) >= set(ev.OOD_SCORES) | {"serra_log_px", "log_px+mahalanobis"}
    chosen = report["ood"]["detector"]["chosen"]
    assert chosen in report["ood"]["metrics"] and chosen in report["ood"]["detector"]["selection"]["candidates"]
    for per_set in report["ood"]["metrics"].values():
        assert set(per_set) == set(ev.SYNTHETIC_OOD)
        for m in per_set.values():
            assert 0 <= m["auroc"] <= 1 and 0 <= m["fpr_at_95_tpr"] <= 1 and m["num_out"] == len(x_test)
    assert report["ood"]["settings"]["positive_class"] == "in-distribution"
    # log p(x) of the trained model separates uniform noise from its (separable, low-noise) data.
    assert report["ood"]["metrics"]["log_px"]["uniform"]["auroc"] > 0.6
    samples = report["samples"]
    assert samples["conditional"]["num"] == model.num_classes * 8
    assert 0 <= samples["conditional"]["classified_as_conditioning_class"] <= 1
    assert samples["long_chain"]["snapshot_steps"][0] == 0 and samples["long_chain"]["snapshot_steps"][-1] == 6
    frechet = report["frechet"]
    assert frechet["settings"]["metric_name"] == "frechet_distance" and "not an FID" in frechet["settings"]["note"]
    assert set(frechet["distances"]) == {"buffer", "uniform_3_steps", "held_out_real_images"}
    assert all(d["frechet_distance"] >= 0 for d in frechet["distances"].values())
    robustness = report["robustness"]
    assert robustness["linf_eps_0.1"]["eps_input_units"] == pytest.approx(0.2)  # value range [-1, 1]
    assert robustness["linf_eps_0.1"]["accuracy"] <= robustness["clean"]["accuracy"]
    files = {name for name in os.listdir(tmp_path)}
    assert {"reliability.png", "reliability_temperature_scaled.png", "samples_unconditional.png",
            "samples_conditional.png", "samples_buffer.png", "samples_long_chain.png", "long_chain_energy.png",
            *(f"ood_hist_{s}.png" for s in ev.OOD_SCORES)} <= files
    for name in files - {ev.REPORT_FILE}:
        assert open(tmp_path / name, "rb").read(8) == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_same_seed_same_report_and_input_noise_is_explicit(trained, tmp_path):
    model, _, (x_val, y_val), (x_test, y_test), _ = trained
    ood = {"uniform": ev.synthetic_ood_images("uniform", x_test, seed=1)}
    runs = [ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path / str(i)),
                        modes=("accuracy", "ood", "robustness"), val_images=x_val, val_labels=y_val, ood_sets=ood,
                        **SMALL) for i in range(2)]
    for mode in ("accuracy", "ood", "robustness"):
        assert runs[0][mode] == runs[1][mode]
    noisy = ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path / "noisy"),
                        modes=("ood",), val_images=x_val, val_labels=y_val, ood_sets=ood, input_noise_std=0.3,
                        **SMALL)
    assert noisy["settings"]["transforms"] == ["gaussian noise std 0.3 added to test and OOD inputs (seed 0)"]
    assert noisy["ood"]["score_means"] != runs[0]["ood"]["score_means"]


def test_evaluate_rejects_bad_arguments(trained, tmp_path):
    model, _, _, (x_test, y_test), path = trained
    with pytest.raises(ValueError, match="modes"):
        ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path), modes=("speed",))
    with pytest.raises(ValueError, match="ood_sets"):
        ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path), modes=("ood",))
    with pytest.raises(ValueError, match="no FID"):
        ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path), modes=("frechet",))
    with pytest.raises(ValueError, match=r"has images of shape \(4, 4, 1\)"):
        ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path), modes=("ood",),
                    ood_sets={"small": np.zeros((3, 4, 4, 1), np.float32)})
    with pytest.raises(ValueError, match="--inception-weights"):
        ev.load_feature_network(ev.INCEPTION, image_shape=(8, 8, 1), inception_weights=str(tmp_path / "none.h5"))
    with pytest.raises(ValueError, match="no layer 'nope'"):
        ev.load_feature_network(path, image_shape=(8, 8, 1), layer="nope")
    with pytest.raises(ValueError, match="takes inputs"):
        ev.load_feature_network(path, image_shape=(28, 28, 1))
