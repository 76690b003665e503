"""jem_tf.train (`python -m jem_tf.train`): runs, resumes, interrupts and refusals through the CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import (
    CLASSIFIER,
    CLI_ENV,
    TINY_TRAIN_ARGS,
    _segmenter,
    cache_files,
    cli_error_line,
    file_snapshot,
    leftovers,
    make_folder,
    users_cnn,
)
from conftest import fill as _fill
from conftest import hostile_folder as _hostile
from conftest import mount_tmpfs as _mount_tmpfs
from conftest import run_command as _cli
from conftest import sha256 as _sha256
from conftest import umount as _umount

from jem_tf import JEM, train
from jem_tf.model.conversion import mean_energy
from jem_tf.model.heads import with_temperature
from jem_tf.run.model_files import load_classifier
from jem_tf.run.splits import load_run_dataset, run_splits
from jem_tf.run.workdir import RunLayout, load_run_config

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


@pytest.mark.parametrize("argv, message", [
    (["--steps-per-execution", "4"], "steps_per_execution (4) must divide the 21 training steps per epoch"),
    (["--precision", "float8"], "precision must be one of"),
])
def test_cli_rejects_bad_performance_options(tmp_path, capsys, argv, message):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        code = train.main(argv + ["--epochs", "1", "--workdir", str(workdir)])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("argv, code, message", [
    (["--dataset", "fashion_mnist", "--data-dir", "/no/such/dir"], 2, "--data-dir '/no/such/dir' does not exist"),
    (["--max-rollbacks", "-1"], 2, "max_rollbacks must be an integer >= 0; received -1"),
    (["--rollback-lr-factor", "0"], 2, "rollback_lr_factor must be in (0, 1]; received 0.0"),
    (["--learning-rate", "nan"], 2, "learning_rate must be a finite number; received nan"),
    (["--stability-guard", "perhaps"], 2, "expected true or false, got 'perhaps'"),
])
def test_cli_bad_inputs_exit_2_with_one_line(argv, code, message, tmp_path, capsys):
    from jem_tf import train

    try:
        result = train.main(argv + ["--workdir", str(tmp_path / "w"), "--epochs", "1"])
    except SystemExit as exit_info:
        result = exit_info.code
    assert result == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("python -m jem_tf.train: error: ")
    assert not (tmp_path / "w" / "model.keras").exists()


@pytest.mark.integration
def test_semi_supervised_cli_end_to_end_and_bad_values(tmp_path, capsys):
    from jem_tf import train

    workdir = str(tmp_path / "run")
    argv = ["--epochs", "1", "--buffer-size", "100", "--sgld-steps", "1", "--width", "4", "--batch-size", "64",
            "--precision", "float32", "--verbose", "0", "--workdir", workdir]
    assert train.main(argv + ["--labels-per-class", "5", "--labelled-batch-size", "16"]) == 0
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert metrics["labels_per_class"] == 5 == config["labels_per_class"] and metrics["num_labelled"] == 50
    assert metrics["steps"] == 21  # one epoch over all 1,293 training images (p(x)) in batches of 64
    for bad, message in ((["--labels-per-class", "0"], "labels_per_class must be an integer >= 1"),
                         (["--labels-per-class", "1000"], "is more than the"),
                         (["--labelled-batch-size", "8"], "labelled_batch_size must be none unless"),
                         (["--labels-per-class", "5", "--labelled-batch-size", "2147483647"],
                          "labelled_batch_size (2147483647) is more than the 50 labelled images")):
        capsys.readouterr()
        assert _exit_code(train.main, argv[:-1] + [str(tmp_path / "bad")] + bad) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not os.path.exists(tmp_path / "bad")


def _exit_code(main, argv):
    """The exit code of a CLI ``main``: returned, or raised as SystemExit by argparse."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.slow
def test_cli_mirrored_on_two_logical_cpus(tmp_path):
    workdir = str(tmp_path / "run")
    assert train.main(["--strategy", "mirrored", "--cpu-devices", "2", "--epochs", "1", "--buffer-size", "100",
                       "--sgld-steps", "2", "--width", "4", "--batch-size", "128", "--num-sample-images", "4",
                       "--verbose", "0", "--workdir", workdir]) == 0
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert metrics["strategy"] == "mirrored" and metrics["num_replicas"] == 2 and metrics["steps"] == 11
    assert not os.path.exists(os.path.join(workdir, "backup"))  # removed after a completed run
    assert isinstance(keras.models.load_model(os.path.join(workdir, "model.keras")), JEM)


@pytest.mark.integration
def test_cli_trains_exports_and_serves_class_names_from_a_colour_folder(tmp_path, cache_dir, capsys):
    import tensorflow as tf

    from jem_tf import train

    root = make_folder(tmp_path / "data", per_class=(28, 4), size=(12, 10))
    workdir, export_dir = tmp_path / "run", tmp_path / "export"
    argv = ["--dataset", root, "--image-size", "8", "8", "--epochs", "1", "--buffer-size", "32", "--sgld-steps",
            "1", "--width", "4", "--batch-size", "16", "--num-sample-images", "4", "--precision", "float32",
            "--choose-refinement", "false", "--validation-fraction", "0.25", "--verbose", "0",
            "--workdir", str(workdir), "--export-dir", str(export_dir)]
    assert train.main(argv) == 0
    metrics = json.load(open(workdir / "metrics.json"))
    assert metrics["class_names"] == ["Bee", "ant", "cat"] and metrics["num_test"] == 12
    config = json.load(open(workdir / "config.json"))
    assert config["image_size"] == [8, 8] and config["dataset"] == root
    served = tf.saved_model.load(metrics["export_path"])
    meta = json.load(open(os.path.join(metrics["export_path"], "assets.extra", "jem_metadata.json")))
    assert meta["class_names"] == ["Bee", "ant", "cat"] and "Pillow bilinear to 8x8" in meta["input"]["preprocessing"]
    out = served.signatures["classify"](images=tf.zeros([2, 8, 8, 3]))
    names = [n.decode() for n in out["predicted_class_name"].numpy()]
    assert names == [meta["class_names"][i] for i in out["predicted_class"].numpy()]


def test_cli_refuses_a_hostile_folder_in_one_line_and_writes_nothing(tmp_path, cache_dir, capsys):
    from jem_tf import train

    root, _ = _hostile(tmp_path, "truncated_jpeg")
    workdir = tmp_path / "run"
    assert train.main(["--dataset", root, "--workdir", str(workdir), "--verbose", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.jpg" in err[0]
    assert not workdir.exists() and cache_files(cache_dir) == []
    no_layout = tmp_path / "plain"
    no_layout.mkdir()
    with pytest.raises(SystemExit):  # a flag's value: argparse's own exit
        train.main(["--dataset", str(no_layout), "--workdir", str(workdir), "--verbose", "0"])
    assert "has no train/ or test/" in capsys.readouterr().err


@pytest.mark.integration
def test_training_saves_settings_chosen_by_the_rule_unless_told_not_to(finished_run, tmp_path):
    import json

    from conftest import TINY_TRAIN_ARGS

    from jem_tf import train
    from jem_tf.run.model_files import load_trained_model

    metrics = json.load(open(f"{finished_run}/metrics.json"))
    chosen = metrics["refinement"]["settings"]
    assert "rule v2" in chosen["source"] and "validation" in chosen["source"]
    assert set(metrics["refinement"]["validation_plain"]["attacked_accuracy"]) == {
        "linf_eps_0.01", "linf_eps_0.02", "linf_eps_0.05", "l2_eps_0.5", "l2_eps_1"}
    model, _ = load_trained_model(finished_run)
    assert model.refinement.describe() == chosen
    workdir = str(tmp_path / "skip")
    assert train.main(TINY_TRAIN_ARGS + ["--workdir", workdir, "--choose-refinement", "false"]) == 0
    assert "refinement" not in json.load(open(f"{workdir}/metrics.json"))
    assert load_trained_model(workdir)[0].refinement is None


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten_without_overwrite(run_copy):
    before = file_snapshot(run_copy)
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", run_copy)
    assert result.returncode == 2
    assert "holds a finished run" in cli_error_line(result) and "--overwrite" in cli_error_line(result)
    assert file_snapshot(run_copy) == before
    # With --overwrite the old run's files are replaced, and no stale checkpoint outranks the new ones.
    checkpoints = RunLayout(run_copy).checkpoints
    open(os.path.join(checkpoints, "epoch_0060.keras"), "wb").write(b"an old run's checkpoint")
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", run_copy, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(checkpoints)) == ["epoch_0001.keras"]
    assert not os.path.exists(RunLayout(run_copy).backup) and not os.path.exists(RunLayout(run_copy).lock)


@pytest.mark.integration
@pytest.mark.parametrize("argv, message", [
    (["--workdir", ""], "--workdir must not be empty"),
    (["--learning-rate", "inf"], "learning_rate must be a finite number"),
    (["--sgld-noise-std", "inf"], "sgld_noise_std must be a finite number"),
    (["--epochs", "1.5"], "--epochs: invalid int value"),
])
def test_bad_values_are_one_line_errors_before_anything_is_written(argv, message, tmp_path):
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", str(tmp_path / "new"), *argv)
    assert result.returncode == 2 and message in cli_error_line(result)
    assert not os.path.exists(tmp_path / "new") and os.listdir(tmp_path) == []


@pytest.mark.integration
@pytest.mark.parametrize("value, message", [
    ('"one"', "epochs must be an integer; received 'one'"), ("null", "epochs must be an integer; received None"),
    ("1.5", "epochs must be an integer; received 1.5"), ("true", "epochs must be an integer; received True"),
])
def test_recipe_fields_of_the_wrong_type(value, message, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"epochs": %s}' % value)
    result = _cli("train", "--recipe", str(recipe), "--workdir", str(tmp_path / "new"))
    assert result.returncode == 2 and message in cli_error_line(result)
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.integration
def test_resume_with_settings_that_do_not_fit_the_backup_is_refused(run_copy):
    layout = RunLayout(run_copy)
    # An interrupted run: its backup is what a resume would load.
    os.makedirs(os.path.join(layout.backup, "epoch_0001"))
    open(os.path.join(layout.backup, "epoch_0001", "state.weights.h5"), "wb").write(b"state")
    before = file_snapshot(run_copy)
    result = _cli("train", *[a if a != "100" else "200" for a in TINY_TRAIN_ARGS], "--workdir", run_copy)
    assert result.returncode == 2
    assert "buffer_size: 100 -> 200" in cli_error_line(result) and "--overwrite" in cli_error_line(result)
    assert file_snapshot(run_copy) == before


@pytest.mark.slow
def test_a_work_directory_in_use_is_refused_naming_the_process(run_copy, tmp_path):
    layout = RunLayout(run_copy)
    shutil.rmtree(layout.checkpoints)
    for path in (layout.model, layout.metrics):
        os.remove(path)  # an empty directory apart from the lock: only the lock can stop this run
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with open(layout.lock, "w") as f:
            json.dump({"pid": sleeper.pid, "host": os.uname().nodename, "started_unix": 0}, f)
        before = file_snapshot(run_copy)
        result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", run_copy)
        assert result.returncode == 2 and f"in use by process {sleeper.pid}" in cli_error_line(result)
        assert file_snapshot(run_copy) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone: the lock is stale and the run goes ahead.
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", run_copy)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stale lock" in result.stdout and not os.path.exists(layout.lock)


UNIFORM = ["--chain-init", "uniform", "--chain-init-uniform-fraction", "0"]


@pytest.fixture
def interrupted_run(finished_run, tmp_path):
    """A copy of a finished run with a backup of 2 epochs, as a run killed in epoch 3 leaves it."""
    copy = str(tmp_path / "run")
    shutil.copytree(finished_run, copy)
    layout = RunLayout(copy)
    generation = os.path.join(layout.backup, "epoch_0002")
    os.makedirs(generation)
    open(os.path.join(generation, "state.weights.h5"), "wb").write(b"state")
    json.dump({"epoch": 2, "optimizer_step": 12}, open(os.path.join(generation, "training_metadata.json"), "w"))
    for path in (layout.model, layout.metrics):
        os.remove(path)
    return copy


def _npz(path, y_train, y_test, image_shape=(8, 8)):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (len(y_train),) + image_shape, dtype=np.uint8),
             y_train=np.asarray(y_train, np.int64),
             x_test=rng.integers(0, 256, (len(y_test),) + image_shape, dtype=np.uint8),
             y_test=np.asarray(y_test, np.int64))
    return str(path)


@pytest.mark.integration
def test_resume_with_fewer_epochs_than_done_is_refused_before_any_write(interrupted_run):
    before = file_snapshot(interrupted_run)
    result = _cli(*TINY_TRAIN_ARGS, "--workdir", interrupted_run)  # --epochs 1, 2 done
    assert result.returncode == 2
    line = cli_error_line(result)
    assert "2 epoch(s) done; --epochs 1 is fewer" in line and "--epochs 2 or more" in line, line
    assert file_snapshot(interrupted_run) == before  # config.json is not rewritten


@pytest.mark.integration
@pytest.mark.parametrize("case", ["single_class_uniform", "single_class_default_recipe", "absent_class",
                                  "five_images", "validation_fraction_0.99"])
def test_data_problems_are_one_line_errors_before_the_work_directory_is_written(case, tmp_path):
    workdir = tmp_path / "new"
    if case.startswith("single_class"):  # labels all 3: a "4-class" model of one class
        data = _npz(tmp_path / "one.npz", [3] * 40, [3] * 10)
        argv = ([*TINY_TRAIN_ARGS, "--dataset", data, *UNIFORM] if case.endswith("uniform")
                else ["--dataset", data, "--epochs", "1", "--verbose", "0"])  # the digits recipe's class Gaussians
        expected = ("the training split (after the validation split) has images of 1 class(es) (3); a JEM needs at "
                    "least 2")
    elif case == "absent_class":  # class 1 only in the test split
        data = _npz(tmp_path / "gap.npz", [0, 2] * 20, [0, 1, 2] * 4)
        argv = [*TINY_TRAIN_ARGS, "--dataset", data, *UNIFORM]
        expected = "class(es) 1 of 3 (class ids 0..the largest label) have no images in the training split"
    elif case == "five_images":
        data = _npz(tmp_path / "five.npz", [0, 1, 2, 0, 1], [0, 1, 2])
        argv = [*TINY_TRAIN_ARGS, "--dataset", data]
        expected = (f"Dataset {data!r}: cannot split off the validation split (validation_fraction=0.1): class 2 "
                    "has 1 image (of 5)")
    else:  # 14 training images of 10 digits: a class Gaussian of one image
        argv = [*TINY_TRAIN_ARGS, "--validation-fraction", "0.99", "--chain-init", "class_gaussian"]
        expected = "Every class needs at least 2 images to fit its Gaussian"
    result = _cli(*argv, "--workdir", str(workdir))
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in cli_error_line(result), cli_error_line(result)
    assert not workdir.exists()


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["device", "fifo", "huge"])
def test_recipes_that_are_not_regular_files_or_too_big(kind, tmp_path):
    if kind == "device":
        recipe = "/dev/zero"
    elif kind == "fifo":
        recipe = str(tmp_path / "recipe.json")
        os.mkfifo(recipe)  # opening it would block forever
    else:
        recipe = str(tmp_path / "huge.json")
        with open(recipe, "wb") as f:
            f.truncate(1 << 30)  # 1 GiB (sparse): refused by its size, never read
    result = _cli("--recipe", recipe, "--workdir", str(tmp_path / "new"), timeout=120)
    assert result.returncode == 2
    line = cli_error_line(result)
    if kind == "huge":
        assert f"Recipe {recipe!r} is 1,073,741,824 bytes, more than a recipe's limit of 1,048,576" in line, line
    else:
        assert f"Recipe {recipe!r} is not a regular file" in line, line
    assert not (tmp_path / "new").exists()


HOLD_LOCK = """
import sys, time
from jem_tf.run.workdir import RunLayout
from jem_tf.run.workdir_lock import WorkdirLock
lock = WorkdirLock(RunLayout(sys.argv[1]), log=None).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_lock(workdir, seconds=600):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir, str(seconds)], stdout=subprocess.PIPE,
                              text=True, env=CLI_ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_live_lock_is_reported_before_any_other_check(interrupted_run):
    holder = _hold_lock(interrupted_run)
    try:
        before = file_snapshot(interrupted_run)
        # Other settings than the backup's (buffer_size): the busy directory is what must be reported.
        other_buffer = [a if a != "100" else "200" for a in TINY_TRAIN_ARGS]
        result = _cli(*other_buffer, "--epochs", "3", "--workdir", interrupted_run)
        assert result.returncode == 2
        line = cli_error_line(result)
        assert f"is in use by process {holder.pid} on {os.uname().nodename}" in line, line
        assert "interrupted run" not in line
        assert file_snapshot(interrupted_run) == before
    finally:
        holder.kill()
        holder.wait()


UNTIL_EVENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "train_until_event.py")


def _start_until_event(event, when, *argv):
    """A training that stops at ``when`` (see helpers/train_until_event.py), signals ``event`` and waits there."""
    run = subprocess.Popen([sys.executable, UNTIL_EVENT, str(event), when, *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=CLI_ENV)
    deadline = time.time() + 300
    while not os.path.exists(event):
        if run.poll() is not None or time.time() > deadline:
            run.kill()
            out, err = run.communicate()
            pytest.fail(f"the run ended before its event ({run.returncode}):\n{err[-3000:]}")
        time.sleep(0.05)
    return run


def _finish(run, timeout):
    """``run.communicate(timeout=...)``; a run still going at the timeout writes its threads' stacks (SIGUSR1, see
    helpers/train_until_event.py), is killed, and the test fails with the end of its stderr."""
    try:
        return run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGUSR1)
        time.sleep(2)
        run.kill()
        out, err = run.communicate()
        lines = [line for line in err.splitlines() if not line.startswith(("I0000", "E0000", "W0000", "WARNING: All"))]
        pytest.fail(f"the run did not end within {timeout} s; its stderr (last lines):\n" + "\n".join(lines[-150:]))


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_same_command_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    argv = [*TINY_TRAIN_ARGS, "--epochs", "2", "--workdir", workdir]
    run = _start_until_event(tmp_path / "event", "batch:1:2", *argv)  # mid-epoch 2 (of 6 batches)
    run.send_signal(signal.SIGINT)
    out, err = _finish(run, 120)
    assert run.returncode == 130, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("python -m jem_tf.train")]
    assert ours == ["python -m jem_tf.train: interrupted; rerun the same command to resume from epoch 2"], err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    layout = RunLayout(workdir)
    assert not os.path.exists(layout.lock) and not os.path.exists(layout.model) and not leftovers(workdir)
    result = _cli(*argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resuming from the backup" in result.stdout and "1 epoch(s) done" in result.stdout


@pytest.mark.slow
def test_overwrite_never_follows_a_link_out_of_the_work_directory(run_copy, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's")
    layout = RunLayout(run_copy)
    shutil.rmtree(layout.logs)
    os.symlink(str(outside), layout.logs)
    result = _cli(*TINY_TRAIN_ARGS, "--workdir", run_copy, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (outside / "keep.txt").read_text() == "not the run's" and os.listdir(outside) == ["keep.txt"]
    assert os.path.isdir(layout.logs) and not os.path.islink(layout.logs) and not leftovers(run_copy)


@pytest.mark.integration
def test_overwrite_that_fails_half_way_deletes_nothing(run_copy):
    layout = RunLayout(run_copy)
    saved = layout.checkpoints + ".saved"
    shutil.move(layout.checkpoints, saved)
    _mount_tmpfs(layout.checkpoints, "16m")  # a mount point cannot be renamed away: the removal fails there
    try:
        for name in os.listdir(saved):
            shutil.copy(os.path.join(saved, name), layout.checkpoints)
        shutil.rmtree(saved)
        before = file_snapshot(run_copy)
        result = _cli(*TINY_TRAIN_ARGS, "--workdir", run_copy, "--overwrite")
        assert result.returncode == 2
        line = cli_error_line(result)
        assert f"--overwrite cannot remove {layout.checkpoints}" in line and "nothing was deleted" in line, line
        assert file_snapshot(run_copy) == before and not leftovers(run_copy)
    finally:
        _umount(layout.checkpoints)


@pytest.mark.slow
def test_a_full_disk_is_one_line_keeps_the_last_good_backup_and_the_rerun_completes(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64m")
    try:
        workdir = str(disk / "run")
        argv = [*TINY_TRAIN_ARGS, "--epochs", "3", "--workdir", workdir]
        event = tmp_path / "event"
        run = _start_until_event(event, "batch:1:5", *argv)  # epoch 1 backed up; the last batch of epoch 2
        filler = disk / "filler"
        _fill(filler)  # the disk fills up while the run trains
        os.remove(event)  # the run goes on: epoch 2's backup does not fit
        out, err = _finish(run, 300)
        assert run.returncode == 1, err[-3000:]
        line = [line for line in err.splitlines() if line.startswith("python -m jem_tf.train")]
        assert len(line) == 1 and "Traceback" not in err, err[-3000:]
        backup = os.path.join(workdir, "backup")
        assert (f"error: cannot write {os.path.join(backup, 'epoch_0002')}: the disk is full (no space left on "
                f"device); the last good epoch (1) is kept in {backup}; free space and rerun the same command to resume"
                in line[0]), line
        layout = RunLayout(workdir)
        assert os.listdir(layout.backup) == ["epoch_0001"] and not leftovers(workdir)
        assert not os.path.exists(layout.lock) and not os.path.exists(layout.model)
        os.remove(filler)  # space freed: the same command completes
        result = _cli(*argv)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "1 epoch(s) done" in result.stdout and os.path.isfile(layout.model) and not leftovers(workdir)
    finally:
        _umount(disk)


@pytest.mark.slow
def test_a_kill_of_the_real_writer_during_the_final_save_loses_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    argv = [*TINY_TRAIN_ARGS, "--epochs", "2", "--workdir", workdir]
    run = _start_until_event(tmp_path / "event", "final-save", *argv)  # model.keras written, not yet renamed
    layout = RunLayout(workdir)
    partial = [name for name in os.listdir(workdir) if name.startswith(".model.keras.tmp-")]
    assert len(partial) == 1 and not os.path.exists(layout.model)  # the kill lands during the final save
    run.kill()
    run.communicate()
    assert run.returncode == -signal.SIGKILL and os.path.isdir(layout.backup)  # the backup survives the kill
    result = _cli(*argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resuming from the backup" in result.stdout and "2 epoch(s) done" in result.stdout
    import keras

    assert keras.models.load_model(layout.model).optimizer.iterations.numpy() == 2 * 6  # 1,293 images / 256
    assert not os.path.exists(layout.backup) and not leftovers(workdir)  # the killed writer's file is gone


# Precision pinned: the reference and the victim are two runs, and "auto" probes the machine's speed (a
# resumed run reuses its own probe: tests/test_pipeline.py).
RUN = [sys.executable, "-m", "jem_tf.train", "--precision", "float32", "--epochs", "4", "--width", "8",
       "--sgld-steps", "3", "--buffer-size", "300", "--batch-size", "32", "--validation-fraction", "0",
       "--num-sample-images", "4",
       "--warmup-steps", "20", "--learning-rate", "0.002", "--augment", "crop", "--verbose", "2"]


def _run(workdir, log_path, **kwargs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(RUN + ["--workdir", str(workdir)], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env=env, **kwargs)


def _final_state(workdir):
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))
    return model.get_weights(), model.replay_buffer.samples.numpy(), [v.numpy() for v in model.optimizer.variables]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = _run(tmp_path / "reference", tmp_path / "reference.log")
    assert reference.wait(timeout=400) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    # The victim stops after batch 20 of its epoch 3 (of 45), signals, and waits there: the kill lands mid-run.
    event = tmp_path / "event"
    victim = subprocess.Popen([sys.executable, UNTIL_EVENT, str(event), "batch:2:20", *RUN[3:], "--workdir",
                               str(tmp_path / "victim")], stdout=open(tmp_path / "first.log", "w"),
                              stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.time() + 300
    while not event.exists():
        assert victim.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    backup = tmp_path / "victim" / "backup"
    assert sorted(os.listdir(backup)) == ["epoch_0001", "epoch_0002"]  # killed in epoch 3: mid-run
    assert not (tmp_path / "victim" / "model.keras").exists()
    restarted = _run(tmp_path / "victim", tmp_path / "second.log")
    assert restarted.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert "Resuming from the backup" in log and "epoch(s) done" in log
    metrics = json.load(open(tmp_path / "victim" / "metrics.json"))
    assert metrics["resumed_from_epoch"] == 2 and metrics["steps"] == 4 * 45  # 1,437 images / 32

    weights, buffer, optimizer = _final_state(tmp_path / "victim")
    ref_weights, ref_buffer, ref_optimizer = _final_state(tmp_path / "reference")
    # Weights, optimizer slots and step, replay buffer, warm-up position, RNG and data order all resume:
    # the resumed run is bit-identical to the uninterrupted one.
    for a, b in zip(weights + [buffer] + optimizer, ref_weights + [ref_buffer] + ref_optimizer):
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "victim" / "backup").exists()  # removed once the run completed


CONVERT = ["--recipe", "digits_finetune", "--epochs", "2", "--buffer-size", "100", "--sgld-steps", "1",
           "--batch-size", "256", "--precision", "float32", "--num-sample-images", "4", "--verbose", "0"]

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.mark.integration
def test_cli_converts_a_trained_run(classifier_run, tmp_path, capsys):
    workdir = str(tmp_path / "converted")
    assert train.main(CONVERT + ["--init-from", classifier_run, "--workdir", workdir,
                                 "--energy-l2-weight", "0.01"]) == 0
    assert "test_accuracy=" in capsys.readouterr().out
    digest = _sha256(RunLayout(classifier_run).model)
    config = json.load(open(RunLayout(workdir).config))
    assert config["init_from"] == classifier_run and config["init_from_sha256"] == digest and config["finetune"]
    # The energy L2 term is centred on the classifier's mean energy on the run's training images (recorded), the
    # classifier as the recipe trains on it: divided by its validation temperature under the frozen density head.
    run_config = load_run_config(workdir)
    splits = run_splits(run_config, load_run_dataset(config=run_config))
    source = load_classifier(classifier_run, image_shape=(8, 8, 1), num_classes=10)
    metrics = json.load(open(RunLayout(workdir).metrics))
    temperature = metrics["init_from"]["temperature"]
    assert temperature != 1.0 and metrics["temperature"]["fitted_to"] == "the source classifier, before training"
    calibrated = with_temperature(source.network, temperature)
    assert config["energy_l2_center"] == pytest.approx(mean_energy(calibrated, splits.train.images), rel=1e-5)
    assert metrics["init_from"] == {"path": os.path.abspath(RunLayout(classifier_run).model), "sha256": digest,
                                    "kind": "jem-tf model", "changes": [], "temperature": temperature}
    assert metrics["steps"] == 2 * 6 and np.isfinite(metrics["buffer_energy_mean"])  # 1,293 images / 256
    model = keras.models.load_model(RunLayout(workdir).model)
    assert isinstance(model, JEM) and model.chain_init is not None and model.samples_contrastive
    assert model.energy_l2_center == config["energy_l2_center"]


@pytest.mark.integration
def test_cli_density_head_conversion_keeps_the_classifiers_predictions_exactly(classifier_run, tmp_path):
    workdir = str(tmp_path / "converted")
    assert train.main(CONVERT + ["--init-from", classifier_run, "--workdir", workdir, "--density-head", "16",
                                 "--density-head-finetune", "false", "--temperature-scaling", "false",
                                 "--learning-rate", "0.05", "--warmup-steps", "0"]) == 0
    source = load_classifier(classifier_run, image_shape=(8, 8, 1), num_classes=10)
    model = keras.models.load_model(RunLayout(workdir).model)
    images = load_run_dataset(config=load_run_config(workdir)).x_test[:64]
    np.testing.assert_allclose(keras.ops.softmax(model.predict(images, verbose=0)),
                               keras.ops.softmax(source.network.predict(images, verbose=0)), atol=1e-5)
    assert np.abs(model.energy(images) + np.log(np.exp(source.network.predict(images, verbose=0).astype(
        np.float64)).sum(axis=1))).max() > 1e-3  # the density head moved the energy
    assert [layer.name for layer in model.backbone.layers if layer.trainable_weights] == [
        "density_hidden", "density_offset"]


@pytest.mark.integration
def test_cli_temperature_scaling_divides_the_classifiers_logits_by_the_validation_temperature(classifier_run, tmp_path,
                                                                                               capsys):
    """`--temperature-scaling true` with a density head: the converted model's logits' class part is the classifier's
    divided by the temperature that minimises the validation NLL (the same predictions, the NLL no worse)."""
    from jem_tf.metrics import fit_temperature

    workdir = str(tmp_path / "calibrated")
    assert train.main(CONVERT + ["--init-from", classifier_run, "--workdir", workdir, "--density-head", "16",
                                 "--density-head-finetune", "false", "--temperature-scaling", "true",
                                 "--epochs", "1"]) == 0
    config = load_run_config(workdir)
    splits = run_splits(config, load_run_dataset(config=config))
    source = load_classifier(classifier_run, image_shape=(8, 8, 1), num_classes=10)
    expected = fit_temperature(source.network.predict(splits.validation.images, verbose=0), splits.validation.labels)
    record = json.load(open(RunLayout(workdir).metrics))["init_from"]
    assert record["temperature"] == pytest.approx(expected, rel=1e-6) and record["temperature"] != 1.0
    assert f"Temperature: {expected:.4g}" in capsys.readouterr().out
    model = keras.models.load_model(RunLayout(workdir).model)
    images = splits.test.images[:64]
    np.testing.assert_allclose(keras.ops.softmax(model.predict(images, verbose=0)),
                               keras.ops.softmax(source.network.predict(images, verbose=0) / expected), atol=1e-5)
    assert json.load(open(RunLayout(workdir).metrics))["temperature"] == {
        "value": record["temperature"], "fitted_to": "the source classifier, before training"}


@pytest.mark.integration
def test_cli_density_temperature_sets_log_px_under_the_calibrated_predictions(classifier_run, tmp_path):
    """`--density-temperature 2` under `--temperature-scaling true`: p(y|x) is the classifier's divided by the
    validation temperature T, log p(x) the logsumexp of its logits divided by 2T plus the head's offset, and the
    energy L2 centre is the mean of those energies."""
    workdir = str(tmp_path / "calibrated")
    assert train.main(CONVERT + ["--init-from", classifier_run, "--workdir", workdir, "--density-head", "16",
                                 "--density-head-finetune", "false", "--temperature-scaling", "true",
                                 "--density-temperature", "2", "--epochs", "1"]) == 0
    metrics = json.load(open(RunLayout(workdir).metrics))
    temperature = metrics["init_from"]["temperature"]
    config = load_run_config(workdir)
    assert temperature != 1.0 and config.density_temperature == 2.0
    splits = run_splits(config, load_run_dataset(config=config))
    source = load_classifier(classifier_run, image_shape=(8, 8, 1), num_classes=10)
    assert config.energy_l2_center == pytest.approx(
        mean_energy(with_temperature(source.network, 2.0 * temperature), splits.train.images), rel=1e-5)
    model = keras.models.load_model(RunLayout(workdir).model)
    images = splits.test.images[:64]
    raw = source.network.predict(images, verbose=0).astype(np.float64)
    np.testing.assert_allclose(keras.ops.softmax(model.predict(images, verbose=0)),
                               keras.ops.softmax(raw / temperature), atol=1e-5)
    offset = keras.Model(model.backbone.input, model.backbone.get_layer("density_offset").output)
    tau = 2.0 * temperature
    lse = np.log(np.exp((raw - raw.max(1, keepdims=True)) / tau).sum(1)) + raw.max(1) / tau
    np.testing.assert_allclose(-model.energy(images), lse + offset.predict(images, verbose=0)[:, 0], rtol=1e-4,
                               atol=1e-3)


@pytest.mark.integration
def test_temperature_scaling_of_a_trained_model_folds_the_validation_temperature_into_its_head(tmp_path):
    """Without a frozen density head, `--temperature-scaling true` fits the temperature to the trained model on the
    validation split and divides its head by it: the saved model's validation logits need no further temperature."""
    from jem_tf.metrics import fit_temperature

    workdir = str(tmp_path / "calibrated")
    assert train.main(CLASSIFIER + ["--epochs", "3", "--learning-rate", "0.01", "--warmup-steps", "0", "--batch-size",
                                    "64", "--workdir", workdir, "--temperature-scaling", "true"]) == 0
    metrics = json.load(open(RunLayout(workdir).metrics))
    assert metrics["temperature"]["fitted_to"] == "the trained model" and metrics["temperature"]["value"] != 1.0
    assert "temperature_scaling" in metrics["end_of_training_seconds"]
    config = load_run_config(workdir)
    splits = run_splits(config, load_run_dataset(config=config))
    model = keras.models.load_model(RunLayout(workdir).model)
    assert fit_temperature(model.predict(splits.validation.images, verbose=0), splits.validation.labels) == \
        pytest.approx(1.0, abs=2e-3)


@pytest.mark.integration
def test_cli_converts_a_users_keras_classifier_with_a_softmax_head(tmp_path):
    path = str(tmp_path / "mine.keras")
    users_cnn("softmax", num_classes=10).save(path)
    workdir = str(tmp_path / "converted")
    assert train.main(CONVERT + ["--init-from", path, "--workdir", workdir, "--epochs", "1"]) == 0
    record = json.load(open(RunLayout(workdir).metrics))["init_from"]
    assert record["kind"] == "keras classifier" and record["sha256"] == _sha256(path)
    assert "took the logits of the softmax head: layer 'dense" in record["changes"][0]


def _bad_sources(tmp_path, classifier_run):
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip archive")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    shapes = {}
    for name, model in [("fashion", users_cnn(input_shape=(28, 28, 1), num_classes=10)),
                        ("five", users_cnn(num_classes=5)), ("segmenter", _segmenter())]:
        shapes[name] = str(tmp_path / f"{name}.keras")
        model.save(shapes[name])
    loop = tmp_path / "loop.keras"
    os.symlink(loop, loop)
    return [
        ([], "init_from must be the trained classifier this fine-tuning recipe converts"),
        (["--init-from", str(loop)], "is a symbolic link that leads nowhere (a loop, or a missing target)"),
        (["--init-from", str(tmp_path / "nope")], f"--init-from {str(tmp_path / 'nope')!r} does not exist"),
        (["--init-from", str(empty)], "is a directory without a trained model"),
        (["--init-from", str(garbage)], "is not a .keras archive (truncated or corrupt: not a zip file)"),
        (["--init-from", shapes["fashion"]], r"takes images of shape (28, 28, 1), but the data's images have shape "
                                             "(8, 8, 1)"),
        (["--init-from", shapes["five"]], "has 5 classes, but the data has 10"),
        (["--init-from", shapes["segmenter"]], "is not a classifier: its output has shape (None, 8, 8, 3)"),
        (["--init-from", classifier_run, "--init-from-sha256", "0" * 64],
         "not the 0000000000000000000000000000000000000000000000000000000000000000 of init_from_sha256"),
        (["--init-from", classifier_run, "--init-from-sha256", "abc"], "init_from_sha256 must be none, or the 64"),
    ]


@pytest.mark.parametrize("index", range(10))
def test_bad_sources_are_one_line_errors_before_anything_is_written(index, classifier_run, tmp_path, capsys):
    argv, message = _bad_sources(tmp_path, classifier_run)[index]
    workdir = tmp_path / "converted"
    try:
        code = train.main(CONVERT + argv + ["--workdir", str(workdir)])
    except SystemExit as exit_:  # argparse-level errors
        code = exit_.code
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not workdir.exists()


def test_a_source_among_the_run_files_that_overwrite_clears_is_refused(classifier_run, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(classifier_run, run)
    checkpoint = sorted(os.listdir(RunLayout(run).checkpoints))[-1]
    linked = tmp_path / "linked"
    os.symlink(run, linked)
    before = file_snapshot(run)
    for source in [run, RunLayout(run).model, os.path.join(RunLayout(run).checkpoints, checkpoint),
                   str(linked / "model.keras")]:
        assert train.main(CONVERT + ["--init-from", source, "--workdir", run, "--overwrite"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "lies inside the run files of --workdir" in errors[0], errors
        assert file_snapshot(run) == before  # the source and everything else untouched


KILL_DURING_FINAL_SAVE = """
import os, signal, sys
import jem_tf.training.pipeline as training

def save_then_die(model, path):
    os.kill(os.getpid(), signal.SIGKILL)

training.save_model_atomically = save_then_die
from jem_tf.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_interrupted_conversion_resumes_and_refuses_a_changed_source(classifier_run, tmp_path):
    source = str(tmp_path / "source")
    import shutil

    shutil.copytree(classifier_run, source)
    workdir = str(tmp_path / "converted")
    argv = CONVERT + ["--init-from", source, "--workdir", workdir]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_FINAL_SAVE, *argv], capture_output=True, text=True,
                            timeout=600, env=ENV)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert os.path.isdir(RunLayout(workdir).backup) and not os.path.exists(RunLayout(workdir).model)

    # The source changed since the run started: its backup is not resumed with another classifier.
    original = open(RunLayout(source).model, "rb").read()
    users_cnn(num_classes=10).save(RunLayout(source).model)
    changed = subprocess.run([sys.executable, "-m", "jem_tf.train", *argv], capture_output=True, text=True,
                             timeout=600, env=ENV)
    assert changed.returncode == 2 and "init_from_sha256: '" in changed.stderr, changed.stderr[-2000:]

    open(RunLayout(source).model, "wb").write(original)
    resumed = subprocess.run([sys.executable, "-m", "jem_tf.train", *argv], capture_output=True, text=True,
                             timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from the backup" in resumed.stdout and "2 epoch(s) done" in resumed.stdout
    metrics = json.load(open(RunLayout(workdir).metrics))
    assert metrics["resumed_from_epoch"] == 2 and metrics["init_from"]["sha256"] == _sha256(RunLayout(source).model)


@pytest.mark.integration
def test_a_converted_runs_export_chooses_among_its_classifiers_detectors_too(classifier_run, tmp_path):
    workdir, export_dir = str(tmp_path / "converted"), str(tmp_path / "export")
    assert train.main(CONVERT + ["--init-from", classifier_run, "--workdir", workdir, "--epochs", "1",
                                 "--export-dir", export_dir]) == 0
    metrics = json.load(open(RunLayout(workdir).metrics))
    metadata = json.load(open(os.path.join(metrics["export_path"], "assets.extra", "jem_metadata.json")))
    table = metadata["ood"]["selection"]["candidates"]
    assert {row["origin"] for row in table.values()} == {"this model", "source classifier", "both"}
    assert table["source_mahalanobis"]["origin"] == "source classifier"
    assert metadata["ood"]["score"] in table and metrics["ood_detector"]["score"] == metadata["ood"]["score"]
