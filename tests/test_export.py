"""jem_tf.export (`python -m jem_tf.export`): runs exported through the CLI, and its one-line errors."""

import json
import os
import re

import pytest

from jem_tf.export import main as export_main
from jem_tf.serving import METADATA_FILE


@pytest.mark.integration
def test_export_cli_from_a_training_workdir(tmp_path, capsys):
    from jem_tf import train

    workdir = str(tmp_path / "run")
    assert train.main(["--epochs", "1", "--buffer-size", "100", "--sgld-steps", "1", "--width", "4",
                       "--batch-size", "256", "--verbose", "0", "--workdir", workdir,
                       "--export-dir", str(tmp_path / "served")]) == 0
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert metrics["export_path"] == str(tmp_path / "served" / "1")
    capsys.readouterr()
    # The memory guard: 1e9 digits samples would be 256 GB; rejected once the model's image shape is known.
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", workdir, "--export-dir", str(tmp_path / "served"), "--max-num-samples", "1000000000"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--max-num-samples must be <= 4194304 for images of shape [8, 8, 1] (1 GiB" in err
    assert sorted(os.listdir(tmp_path / "served")) == ["1"]
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", workdir, "--export-dir", str(tmp_path / "served"), "--max-batch-size", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--max-batch-size must be an int in [1, " in err
    assert sorted(os.listdir(tmp_path / "served")) == ["1"]
    assert export_main(["--model", workdir, "--export-dir", str(tmp_path / "served"), "--max-n-steps", "100000",
                        "--max-step-size", "25", "--max-noise-std", "0.5", "--ood-outlier-kinds", "noised", "mosaic",
                        "--ood-accepted-shifts", "blurred", "--max-batch-size", "64"]) == 0
    assert "exported " + str(tmp_path / "served" / "2") in capsys.readouterr().out
    metadata = json.load(open(tmp_path / "served" / "2" / METADATA_FILE))
    assert metadata["sample"]["max_n_steps"] == 100_000 and metadata["sample"]["max_step_size"] == 25.0
    assert metadata["max_batch_size"] == 64
    assert metadata["sample"]["max_noise_std"] == 0.5 and metadata["sample"]["clipped_to_value_range"] is True
    # Chosen and calibrated on the run's validation split (10 % of the 1,437 digits training images), with the
    # training split's feature statistics (so the Mahalanobis candidates were in the running).
    assert metadata["dataset"] == "digits" and metadata["ood"]["num_calibration_images"] == 144
    assert metadata["ood"]["calibration_split"] == "validation"
    selection = metadata["ood"]["selection"]
    assert "mahalanobis" in selection["candidates"] and selection["chosen"] == metadata["ood"]["score"]
    assert selection["outlier_kinds"] == ["noised", "mosaic"] and selection["accepted_shifts"] == ["blurred"]
    assert set(selection["candidates"]["log_px"]["accepted_shifts"]) == {"blurred"}
    first = json.load(open(tmp_path / "served" / "1" / METADATA_FILE))["ood"]["selection"]
    assert first["accepted_shifts"] == ["blurred", "low_contrast", "translated"]
    assert metadata["ood"]["parameters"]["mahalanobis"]["class_means_shape"][0] == 10
    served = json.load(open(tmp_path / "served" / "1" / METADATA_FILE))
    assert metrics["ood_detector"]["score"] == served["ood"]["score"]
    assert "x / 8 - 1" in metadata["input"]["preprocessing"]


@pytest.mark.integration
def test_no_validation_split_means_no_silent_test_calibration(tmp_path, capsys):
    from jem_tf import train

    workdir = str(tmp_path / "run")
    # Training with an export and no validation split is refused before anything runs...
    with pytest.raises(SystemExit):
        train.main(["--validation-fraction", "0", "--export-dir", str(tmp_path / "served"), "--workdir", workdir])
    assert "validation_fraction" in capsys.readouterr().err and not os.path.exists(workdir)
    assert train.main(["--epochs", "1", "--buffer-size", "100", "--sgld-steps", "1", "--width", "4",
                       "--batch-size", "256", "--verbose", "0", "--workdir", workdir,
                       "--validation-fraction", "0"]) == 0
    # ...and exporting it asks for the test split explicitly.
    with pytest.raises(SystemExit):
        export_main(["--model", workdir, "--export-dir", str(tmp_path / "served")])
    assert "--calibration-split test" in capsys.readouterr().err
    assert export_main(["--model", workdir, "--export-dir", str(tmp_path / "served"), "--calibration-split", "test",
                        "--ood-detector", "log_px"]) == 0
    metadata = json.load(open(tmp_path / "served" / "1" / METADATA_FILE))
    assert metadata["ood"]["calibration_split"] == "test" and metadata["ood"]["score"] == "log_px"
    assert metadata["ood"]["num_calibration_images"] == 360


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/dir", "--export-dir", "x"], "No model at '/no/such/dir'"),
    (["--export-dir", "x"], "the following arguments are required: --model"),
    # Flag values are checked before anything is loaded (the model path does not exist).
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-num-samples", "0"],
     "--max-num-samples must be >= 1; received 0"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-n-steps", "0"],
     "--max-n-steps must be in [1, 100000]; received 0"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-n-steps", "100001"],
     "--max-n-steps must be in [1, 100000]; received 100001"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-step-size", "nan"],
     "--max-step-size must be finite and > 0; received nan"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-noise-std", "-1"],
     "--max-noise-std must be finite and > 0; received -1.0"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-step-size", "inf"],
     "--max-step-size must be finite and > 0; received inf"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--tpr", "0"], "--tpr must be in (0, 1]; received 0.0"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--ood-accepted-shifts", "blurred", "noised"],
     "--ood-outlier-kinds and --ood-accepted-shifts both name noised; give each kind one role"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--ood-outlier-kinds", "blurred", "blurred"],
     "--ood-outlier-kinds names blurred more than once; give each kind once"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--ood-accepted-shifts", "noised", "noised"],
     "--ood-accepted-shifts names noised more than once; give each kind once"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--ood-outlier-kinds", "sideways"],
     "argument --ood-outlier-kinds: invalid choice: 'sideways'"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--version", "-1"], "--version must be >= 0; received -1"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-num-samples", "many"],
     "argument --max-num-samples: invalid int value: 'many'"),
])
def test_export_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_export_cli_rejects_corrupt_model_file(tmp_path, capsys):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"PK\x03\x04 definitely not a keras archive")
    with pytest.raises(SystemExit):
        export_main(["--model", str(bad), "--export-dir", str(tmp_path / "out"), "--dataset", "digits"])
    # jem_tf.run.model_files' load_trained_model: "Cannot load ..." or, since it checks the archive first, "... is not a
    # .keras archive (truncated or corrupt: not a zip file)".
    assert re.search(r"Cannot load|is not a \.keras archive", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
