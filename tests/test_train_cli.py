import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import leftovers

from jem_tf import JEM, train

TINY = ["--epochs", "1", "--buffer-size", "100", "--sgld-steps", "2", "--width", "4", "--batch-size", "128",
        "--num-sample-images", "16", "--verbose", "0"]


@pytest.mark.integration
def test_cli_trains_one_tiny_epoch_and_writes_the_workdir(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert train.main(TINY + ["--workdir", workdir, "--seed", "3"]) == 0
    assert "test_accuracy=" in capsys.readouterr().out
    files = set(os.listdir(workdir))
    assert {"model.keras", "metrics.json", "config.json", "samples.png", "checkpoints", "logs"} <= files
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["num_test"] == 360 and metrics["steps"] == 11
    assert np.isfinite(metrics["buffer_energy_mean"]) and np.isfinite(metrics["test_energy_mean"])
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["seed"] == 3 and config["sgld_steps"] == 2 and config["dataset"] == "digits"
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))
    assert isinstance(model, JEM) and model.sampler.n_steps == 2 and model.buffer_size == 100
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["epoch_0001.keras"]
    png = open(os.path.join(workdir, "samples.png"), "rb").read()
    assert png.startswith(b"\x89PNG")
    event_files = [f for _, _, fs in os.walk(os.path.join(workdir, "logs")) for f in fs if "tfevents" in f]
    assert len(event_files) >= 2  # scalars (train/validation) and sample images


@pytest.mark.integration
def test_python_m_entry_point_and_recipe_file(tmp_path):
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"epochs": 1, "buffer_size": 64, "sgld_steps": 1, "width": 4,
                                  "batch_size": 256, "px_weight": 0.0, "num_sample_images": 4}))
    workdir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "jem_tf.train", "--recipe", str(recipe), "--workdir", str(workdir), "--verbose", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(workdir / "config.json"))["px_weight"] == 0.0
    assert "buffer_energy_mean" not in json.load(open(workdir / "metrics.json"))  # plain classifier


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "epochs must be an integer >= 1; received 0"),
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--dataset", "imagenet"], "dataset must be one of digits, mnist"),
        (["--recipe", "nope"],
         "Unknown recipe 'nope'; bundled recipes: cifar10, cifar10_finetune, cifar10_wrn28_10, digits, "),
        (["--recipe", "/no/such/recipe.json"], "Recipe file '/no/such/recipe.json' does not exist"),
        (["--cpu-devices", "-1"], "cpu_devices must be an integer >= 0; received -1"),
        (["--devices", "/gpu:0"], "devices must be empty unless strategy is 'mirrored'"),
        (["--strategy", "gpu"], "argument --strategy: invalid choice: 'gpu'"),
        (["--sgld-clamp", "maybe"], "expected true or false, got 'maybe'"),
        (["--backbone", "wrn-27-2"], "backbone must be 'small_cnn', 'fast_cnn' or 'wrn-DEPTH-WIDTH'"),
        (["--restart-prob", "1.5"], "restart_prob must be in [0, 1]; received 1.5"),
        (["--decay-epochs", "5,2"], "decay_epochs must be increasing"),
        (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag 1"),
        (["--chain-init", "normal"], "chain_init must be one of uniform, class_gaussian; received 'normal'"),
        (["--sgld-grad-clamp", "0"], "sgld_grad_clamp must be a number > 0 or none; received 0.0"),
        (["--chain-init-rank", "0"], "chain_init_rank must be an integer >= 1 or none; received 0"),
        (["--precision", "fp8"], "precision must be one of float32, mixed_bfloat16, mixed_float16, auto"),
        (["--precision", "auto", "--strategy", "multi_worker"], "precision must be explicit"),
        (["--classifier-epochs", "60"], "classifier_epochs must be fewer than epochs (60)"),
    ],
)
def test_bad_flags_give_one_line_errors_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_config(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m jem_tf.train: error: ")
    assert message in err


def test_overrides_and_types():
    config, workdir, verbose = train.parse_config(
        ["--sgld-grad-clip", "none", "--decay-epochs", "3,6", "--sgld-clamp", "true", "--learning-rate", "2e-4"])
    assert config.sgld_grad_clip is None and config.decay_epochs == [3, 6] and config.sgld_clamp is True
    assert config.learning_rate == 2e-4 and workdir == "runs/digits"
    assert verbose == 2  # pytest captures stdout: not a terminal, so one line per epoch, not a progress bar


def test_the_default_verbosity_is_a_progress_bar_on_a_terminal_and_one_line_per_epoch_elsewhere(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert train.parse_config([])[2] == 1
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert train.parse_config([])[2] == 2
    assert train.parse_config(["--verbose", "1"])[2] == 1  # --verbose overrides


def test_chain_init_uniform_on_a_recipe_with_uniform_starts():
    # The digits recipe starts 10 % of its class-Gaussian chains from noise; with --chain-init uniform every
    # chain does, so the recipe's share no longer applies (an explicit one is still checked).
    assert train.parse_config([])[0].chain_init_uniform_fraction == 0.1
    config = train.parse_config(["--chain-init", "uniform"])[0]
    assert config.chain_init == "uniform" and config.chain_init_uniform_fraction == 0.0
    with pytest.raises(SystemExit):
        train.parse_config(["--chain-init", "uniform", "--chain-init-uniform-fraction", "0.2"])


@pytest.mark.integration
def test_tiny_fast_jem_run_end_to_end(tmp_path, capsys):
    """Class-Gaussian starts, proximal SGLD and precision auto through the CLI; the Gaussians are saved with
    the final model and the checkpoints, and the probe's choice is logged and recorded."""
    workdir = str(tmp_path / "fast")
    argv = TINY + ["--workdir", workdir, "--chain-init", "class_gaussian", "--sgld-grad-clamp", "1",
                   "--sgld-noise-std", "0", "--sgld-clamp", "true", "--precision", "auto", "--epochs", "2"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "precision auto -> " in out and "measured probe" in out
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert metrics["precision"]["precision"] in ("float32", "mixed_bfloat16")
    assert set(metrics["precision"]["probe_seconds_per_step"]) == {"float32", "mixed_bfloat16"}
    assert json.load(open(os.path.join(workdir, "config.json")))["precision"] == "auto"
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))
    checkpoint = keras.models.load_model(os.path.join(workdir, "checkpoints", "epoch_0002.keras"))
    assert model.chain_init is not None and model.chain_init.rank == 64  # 8x8 digits: full covariance
    for a, b in zip(model.chain_init.weights, checkpoint.chain_init.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert model.sampler.grad_clamp == 1.0 and model.sampler.noise_std == 0.0
    # The Gaussians are those of the run's training split (recomputed here from the same split).
    from jem_tf.data import load_digits, split_validation
    from jem_tf.sampling.chain_init import ClassGaussian

    data = load_digits(seed=0)
    (x_train, y_train), _ = split_validation(data.x_train, data.y_train, fraction=0.1, seed=0)
    refit = ClassGaussian.fit(x_train, y_train, num_classes=10)
    np.testing.assert_array_equal(refit.means.numpy(), model.chain_init.means.numpy())
    samples = model.sample(20, seed=0, n_steps=5)
    assert samples.min() >= -1.0 and samples.max() <= 1.0


def test_missing_data_is_a_clear_cli_error(tmp_path, capsys):
    code = train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--workdir", str(tmp_path / "w")])
    assert code == 2
    err = capsys.readouterr().err
    assert "Dataset 'cifar10' was not found" in err and "--data-dir" in err


@pytest.mark.integration
def test_trains_on_a_npz_file_and_evaluates_against_a_npz_ood_set(tmp_path, monkeypatch, capsys):
    """`--dataset FILE.npz` trains (relative path, kept as given in config.json; the run's seed fixes the
    validation split), `evaluate --ood FILE.npz` scores an OOD-only file's test split, and training on that
    OOD-only file is a one-line error."""
    from jem_tf import evaluate
    from jem_tf.data import load_dataset
    from jem_tf.run.splits import split_train_validation
    from jem_tf.run.workdir import load_run_config

    rng = np.random.default_rng(0)
    labels = np.arange(260) % 3
    images = (rng.integers(0, 120, size=(260, 8, 8)) + 60 * labels[:, None, None]).astype(np.uint8)  # learnable
    monkeypatch.chdir(tmp_path)
    np.savez("mine.npz", x_train=images[:200], y_train=labels[:200], x_test=images[200:], y_test=labels[200:])
    ood = rng.uniform(-1.0, 1.0, size=(40, 8, 8, 1)).astype(np.float32)
    np.savez("ood_only.npz", x_train=np.zeros((0,)), y_train=np.zeros((0,), np.int64), x_test=ood,
             y_test=np.arange(40) % 2)
    workdir = str(tmp_path / "run")
    argv = ["--epochs", "1", "--buffer-size", "64", "--sgld-steps", "1", "--width", "4", "--batch-size", "64",
            "--num-sample-images", "16", "--precision", "float32", "--verbose", "0", "--seed", "5"]
    assert train.main(["--dataset", "mine.npz", *argv, "--workdir", workdir]) == 0
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert metrics["num_test"] == 60 and 0.0 <= metrics["test_accuracy"] <= 1.0
    config = load_run_config(workdir)
    assert config.dataset == "mine.npz" and config.seed == 5
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))
    assert tuple(model.image_shape) == (8, 8, 1) and model.num_classes == 3
    data = load_dataset("mine.npz")
    _, validation = split_train_validation(config, data.x_train, data.y_train)
    _, other_seed = split_train_validation(config.replace(seed=6), data.x_train, data.y_train)
    assert len(validation.images) == 20 and not np.array_equal(validation.labels, other_seed.labels)

    out = str(tmp_path / "eval")
    assert evaluate.main(["--model", workdir, "--out", out, "--modes", "accuracy", "ood",
                          "--ood", "uniform", "ood_only.npz", "--refine-steps", "0"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["model"]["dataset"] == "mine.npz"
    assert report["ood"]["settings"]["ood_sets"] == {"uniform": 60, "ood_only.npz": 40}
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset", "ood_only.npz", *argv, "--workdir", str(tmp_path / "no")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset must be a .npz file with training images" in err
    assert not os.path.exists(tmp_path / "no")


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.5, 2.0, 4.0, 6.0, 9.0, 13.0])
def test_ctrl_c_at_any_point_of_a_run_is_one_line_and_never_ignored(delay_s, tmp_path):
    """SIGINT while Python starts, while TensorFlow imports, while the data and model are built, during the epochs
    and the final evaluation: exit 130 with one line (or 0 when the run had already finished), no traceback, no
    lock or temporary file left; never a run that goes on to the end after the Ctrl-C."""
    import signal
    import time

    workdir = str(tmp_path / "run")
    run = subprocess.Popen([sys.executable, "-m", "jem_tf.train", *TINY, "--epochs", "3", "--workdir", workdir],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    time.sleep(delay_s)
    sent = run.poll() is None
    if sent:
        run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=300)
    assert "Traceback" not in err, err[-3000:]
    finished = os.path.exists(os.path.join(workdir, "metrics.json"))
    if sent and not finished:
        assert run.returncode == 130, err[-3000:]
        ours = [line for line in err.splitlines() if line.startswith("python -m jem_tf")]
        assert len(ours) == 1 and "interrupted" in ours[0], err[-3000:]
    else:  # the run had finished (or was saving its final files) when the signal came
        assert run.returncode in (0, 130), err[-3000:]
    assert not leftovers(tmp_path)
    assert not os.path.exists(os.path.join(workdir, ".lock"))


@pytest.mark.integration
def test_a_run_ends_with_one_summary_line_and_records_its_test_ece(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert train.main(TINY + ["--workdir", workdir]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("test_accuracy=")]
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert len(lines) == 1 and f"test_ece={metrics['test_ece']:.4f}" in lines[0] and lines[0].endswith(f"{workdir}/")
    assert 0.0 <= metrics["test_ece"] <= 1.0
    # What the run did after training, each stage timed.
    stages = metrics["end_of_training_seconds"]
    assert {"save_model", "test_evaluation", "total", "fraction_of_training"} <= set(stages)
    parts = [value for name, value in stages.items() if name not in ("total", "fraction_of_training")]
    assert all(value >= 0 for value in parts) and stages["total"] == sum(parts)
    assert stages["fraction_of_training"] == stages["total"] / metrics["train_seconds"]
