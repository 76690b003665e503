"""jem_tf.evaluate (`python -m jem_tf.evaluate`): a run evaluated through the CLI, and its one-line errors."""

import json
import os
import shutil

import pytest

from jem_tf import evaluate as evaluate_cli
from jem_tf import evaluation as ev
from jem_tf import train


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
    (["--detectors", "log_px", "logpx"], "--detectors: detectors must be distinct candidate names"),
    (["--detectors", "source_log_px"], "need a converted run"),
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
