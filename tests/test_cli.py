"""jem_tf.cli: the commands' boundary: flags, one-line errors (exit 2), tracebacks (1), Ctrl-C (130)."""

import argparse
import os
import subprocess
import sys

import pytest
from conftest import CLI_ENV, TINY_TRAIN_ARGS, cli_error_line, leftovers
from conftest import run_command as _cli

from jem_tf import cli, evaluate, export, train, tune
from jem_tf.errors import UsageError, as_usage_error
from jem_tf.run import model_files
from jem_tf.run.workdir import RunLayout
from jem_tf.training import pipeline as training
from jem_tf.training import tuning


def _parser():
    parser = cli.OneLineErrorParser(prog="prog")
    cli.add_recipe_arguments(parser)
    return parser


def _config(argv):
    parser = _parser()
    return cli.config_from_args(parser, parser.parse_args(argv))


def _one_line_exit(capsys, call):
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("prog: error: "), err
    return err


def test_every_config_field_is_a_flag_parsed_by_its_type():
    config = _config(["--recipe", "digits", "--chain-init-rank", "NONE", "--decay-epochs", "3,6", "--sgld-clamp",
                      "off", "--sgld-grad-clip", "2.5", "--devices", "", "--labels-per-class", "4"])
    assert config.chain_init_rank is None and config.decay_epochs == [3, 6] and config.sgld_clamp is False
    assert config.sgld_grad_clip == 2.5 and config.devices == [] and config.labels_per_class == 4
    assert config.learning_rate == 0.001 and config.epochs == 60  # the recipe's, not the built-in defaults
    assert _config(["--recipe", "digits", "--chain-init-rank", "8"]).chain_init_rank == 8


@pytest.mark.parametrize("argv, message", [
    (["--sgld-clamp", "maybe"], "argument --sgld-clamp: expected true or false, got 'maybe'"),
    (["--decay-epochs", "3,x"], "argument --decay-epochs: invalid comma-separated int list value: '3,x'"),
    (["--strategy", "gpu"], "argument --strategy: invalid choice: 'gpu'"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1; received 0"),  # the config's rule
    (["--recipe", "nope"], "Unknown recipe 'nope'"),
])
def test_bad_flags_are_one_line_errors_naming_the_value(argv, message, capsys):
    assert message in _one_line_exit(capsys, lambda: _config(argv))


def test_uniform_starts_drop_the_recipes_share_of_uniform_starts():
    assert _config([]).chain_init_uniform_fraction == 0.1  # digits: class-Gaussian starts, 10 % uniform
    assert _config(["--chain-init", "uniform"]).chain_init_uniform_fraction == 0.0
    assert _config(["--chain-init", "class_gaussian"]).chain_init_uniform_fraction == 0.1


def test_recipe_name_of_a_name_or_a_path():
    assert cli.recipe_name("digits") == "digits"
    assert cli.recipe_name("runs/tune-digits/best_recipe.json") == "best_recipe"


def test_usage_errors_are_one_line_and_other_errors_propagate(capsys):
    parser = cli.OneLineErrorParser(prog="prog")

    def fail(error):
        with parser.usage_errors():
            raise error

    assert _one_line_exit(capsys, lambda: fail(UsageError("--thing 'x' is not a thing"))) == \
        "prog: error: --thing 'x' is not a thing\n"
    for error in (ValueError("an internal invariant"), KeyError("k"), argparse.ArgumentError(None, "m")):
        with pytest.raises(type(error)):
            fail(error)
    with pytest.raises(UsageError, match="bad file") as converted:
        with as_usage_error():
            raise ValueError("bad file")
    assert isinstance(converted.value, ValueError) and isinstance(converted.value.__cause__, ValueError)


# Each command's boundary: the call inside it, the arguments that reach that call.
COMMANDS = {
    "train": (training, "train_and_evaluate", ["--workdir", "unused"]),
    "evaluate": (model_files, "load_trained_model", ["--model", "unused", "--out", "unused"]),
    "export": (model_files, "load_trained_model", ["--model", "unused", "--export-dir", "unused"]),
    "tune": (tuning, "run_search", ["--directory", "unused"]),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_reports_usage_errors_in_one_line_and_lets_internal_errors_through(command, monkeypatch,
                                                                                        capsys, tmp_path):
    target, inner, argv = COMMANDS[command]
    module = {"train": train, "evaluate": evaluate, "export": export, "tune": tune}[command]
    monkeypatch.chdir(tmp_path)  # "unused" paths are never created

    def raise_(error):
        def call(*args, **kwargs):
            raise error
        return call

    monkeypatch.setattr(target, inner, raise_(UsageError("the data set 'x' is not there")))
    try:
        code = module.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err == f"python -m jem_tf.{command}: error: the data set 'x' is not there\n"
    monkeypatch.setattr(target, inner, raise_(ValueError("an internal invariant broke")))
    with pytest.raises(ValueError, match="an internal invariant broke"):
        module.main(argv)
    assert "error:" not in capsys.readouterr().err


@pytest.mark.integration
def test_an_internal_value_error_in_training_keeps_its_traceback_and_exits_1(tmp_path):
    workdir = tmp_path / "run"
    script = ("import sys\n"
              "import jem_tf.train, jem_tf.training.pipeline\n"
              "def build_jem(*args, **kwargs):\n"
              "    raise ValueError('an internal invariant broke')\n"
              "jem_tf.training.pipeline.build_jem = build_jem\n"
              "sys.exit(jem_tf.train.main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", script, *TINY_TRAIN_ARGS, "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=300, env=CLI_ENV)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: an internal invariant broke" in result.stderr
    assert "python -m jem_tf.train: error:" not in result.stderr
    assert not workdir.exists()  # the model is built before anything is written


@pytest.mark.integration
@pytest.mark.parametrize("failure, code, line", [
    (OSError(28, "No space left on device"), 1, "error: [Errno 28] No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
@pytest.mark.parametrize("command", ["export", "evaluate", "tune"])
def test_every_command_reports_a_full_disk_and_ctrl_c_in_one_line(command, failure, code, line, finished_run,
                                                                   tmp_path, monkeypatch, capsys):
    """The exit codes `train` uses: 1 for a full disk, 130 for Ctrl-C; one line each, no traceback."""
    from jem_tf import serving
    from jem_tf.evaluation import suite

    # The commands import their work after parsing the flags: the functions are patched where they live.
    home, work, argv = {
        "export": (serving, "export_saved_model", ["--model", finished_run, "--export-dir", str(tmp_path / "out")]),
        "evaluate": (suite, "evaluate", ["--model", finished_run, "--out", str(tmp_path / "out"),
                                         "--modes", "accuracy"]),
        "tune": (tuning, "run_search", [*TINY_TRAIN_ARGS, "--directory", str(tmp_path / "out"), "--max-trials", "1"]),
    }[command]
    module = {"export": export, "evaluate": evaluate, "tune": tune}[command]

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(home, work, fail)
    assert module.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m jem_tf.{command}: {line}"), err


def test_a_swallowed_ctrl_c_is_raised_again_and_a_second_one_waits_for_the_clean_up(capsys):
    import signal

    # A command owns Ctrl-C only where Python's own handler is installed: not where the process started with SIGINT
    # ignored (a background job of a non-interactive shell, as a CI runner may start the suite).
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    def body():
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # swallowed by library code on the way
        signal.raise_signal(signal.SIGINT)  # a second Ctrl-C during the clean-up: ignored
        return 0

    try:
        assert cli.run_command("prog", body) == 130
        assert capsys.readouterr().err == "prog: interrupted\n"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # That Ctrl-C was the command's own: the next command, here in a process that ignores SIGINT, succeeds.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert cli.run_command("prog", lambda: 0) == 0
    finally:
        signal.signal(signal.SIGINT, started_with)


@pytest.mark.integration
@pytest.mark.parametrize("command", ["train", "export", "evaluate", "tune"])
def test_only_usage_errors_are_one_line_an_internal_value_error_keeps_its_traceback(command, finished_run, tmp_path,
                                                                                    monkeypatch):
    """The CLI boundary both ways: a plain ValueError from inside the work is a fault, not bad input."""
    from jem_tf import ood
    from jem_tf.evaluation import suite
    from jem_tf.training import factories

    target, name, argv = {
        "train": (factories.ClassGaussian, "fit", [*TINY_TRAIN_ARGS, "--workdir", str(tmp_path / "run")]),
        "export": (ood, "fit_ood_detector", ["--model", finished_run, "--export-dir", str(tmp_path / "out")]),
        "evaluate": (suite, "evaluate", ["--model", finished_run, "--out", str(tmp_path / "out")]),
        "tune": (tuning, "run_search", [*TINY_TRAIN_ARGS, "--directory", str(tmp_path / "out"), "--max-trials", "1"]),
    }[command]

    def fault(*args, **kwargs):
        raise ValueError("an internal fault")

    monkeypatch.setattr(target, name, fault)
    module = {"train": train, "export": export, "evaluate": evaluate, "tune": tune}[command]
    with pytest.raises(ValueError, match="an internal fault"):
        module.main(argv)


def test_another_keras_backend_is_named_at_import():
    result = subprocess.run([sys.executable, "-c", "import jem_tf"], capture_output=True, text=True,
                            env={**CLI_ENV, "KERAS_BACKEND": "jax"}, timeout=120)
    assert result.returncode == 1
    assert "ImportError: jem-tf needs Keras's TensorFlow backend, but KERAS_BACKEND='jax'" in result.stderr


@pytest.mark.parametrize("code", [0, 1])
def test_a_ctrl_c_in_the_teardown_after_a_finished_command_keeps_its_exit_code(code):
    """Python resets SIGINT to the default action before it tears down; a finished command's Ctrl-C there would end
    it by SIGINT (status -2, no line). An object that sends SIGINT to its own process when the teardown collects it."""
    script = ("import os, signal, sys\n"
              "from jem_tf.cli import exit_process\n"
              "class Late:\n"
              "    def __del__(self):\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n"
              "sys.modules['__main__'].late = Late()\n"
              f"exit_process({code})\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "evaluate", "tune"])
@pytest.mark.parametrize("delay_s", [3.0, 8.0])
def test_ctrl_c_in_a_real_command_process_is_one_line_and_exit_130(command, delay_s, finished_run, tmp_path):
    """SIGINT to `python -m jem_tf.export/evaluate/tune` while it imports, loads or works: exit 130 and one line
    (or 0 when it had finished), no traceback, no temporary file left."""
    import signal
    import time

    out = str(tmp_path / "out")
    argv = {"export": ["--model", finished_run, "--export-dir", out],
            "evaluate": ["--model", finished_run, "--out", out],
            "tune": [*TINY_TRAIN_ARGS, "--directory", out, "--max-trials", "3"]}[command]
    run = subprocess.Popen([sys.executable, "-m", f"jem_tf.{command}", *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=CLI_ENV)
    time.sleep(delay_s)
    sent = run.poll() is None
    if sent:
        run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=600)
    assert "Traceback" not in err, err[-3000:]
    if sent and run.returncode != 0:
        assert run.returncode == 130, err[-3000:]
        ours = [line for line in err.splitlines() if line.startswith("python -m jem_tf")]
        assert len(ours) == 1 and "interrupted" in ours[0], err[-3000:]
    assert not leftovers(tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("command", ["train", "evaluate", "export", "tune"])
def test_help_and_a_bad_flag_never_import_tensorflow(command):
    """Each command parses its flags before TensorFlow loads: `--help` prints at once (about 0.1 s, against 5 s
    when TensorFlow was imported first), and so does a flag error."""
    for argv, code in (["--help"], 0), (["--no-such-flag"], 2):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", f"jem_tf.{command}", *argv],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == code, result.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        assert "tensorflow" not in imported and "keras" not in imported
    assert f"usage: python -m jem_tf.{command}" in subprocess.run(
        [sys.executable, "-m", f"jem_tf.{command}", "--help"], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.integration
def test_another_programs_python_m_imports_jem_tf_whole(tmp_path):
    """Only `python -m jem_tf.<command>` imports the package lazily: a user's package run with -m that imports
    jem_tf while Python locates it gets every public name (JEM registered with Keras) at once."""
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("import jem_tf\nEAGER = 'JEM' in vars(jem_tf)\n")
    (package / "main.py").write_text("import userpkg\nprint('eager' if userpkg.EAGER else 'lazy')\n")
    result = subprocess.run([sys.executable, "-m", "userpkg.main"], capture_output=True, text=True, timeout=120,
                            cwd=str(tmp_path), env={**CLI_ENV, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "eager"


@pytest.mark.integration
@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_the_commands_load_a_finished_run_in_their_own_process(command, finished_run, tmp_path):
    """A command imports the package lazily: before it loads a saved model, every class the model names (the JEM,
    its layers, the learning-rate schedule of its optimizer) must be imported and registered with Keras."""
    argv = {"evaluate": ["--model", finished_run, "--out", str(tmp_path / "eval"), "--modes", "accuracy",
                         "--refinement", "sampler", "--refine-steps", "0"],
            "export": ["--model", finished_run, "--export-dir", str(tmp_path / "served")]}[command]
    result = subprocess.run([sys.executable, "-m", f"jem_tf.{command}", *argv], capture_output=True, text=True,
                            timeout=600, env=CLI_ENV)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_paths_that_are_files_or_directories_in_the_wrong_place(tmp_path, finished_run):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", str(a_file))
    assert result.returncode == 2 and "is a file, not a directory" in cli_error_line(result)
    # --export-dir that is a file: refused before training, not after it.
    result = _cli("train", *TINY_TRAIN_ARGS, "--workdir", str(tmp_path / "new"), "--export-dir", str(a_file))
    assert result.returncode == 2 and "--export-dir" in cli_error_line(result)
    assert not os.path.exists(tmp_path / "new")
    result = _cli("export", "--model", finished_run, "--export-dir", str(a_file))
    assert result.returncode == 2 and "--export-dir" in cli_error_line(result) and "is a file" in cli_error_line(result)
    result = _cli("evaluate", "--model", finished_run, "--out", str(a_file), "--modes", "accuracy")
    assert result.returncode == 2 and "--out" in cli_error_line(result) and a_file.read_text() == "not a directory"
    result = _cli("train", "--recipe", str(tmp_path), "--workdir", str(tmp_path / "new"))
    assert result.returncode == 2 and "is a directory, not a JSON file" in cli_error_line(result)


@pytest.mark.slow
def test_misleading_messages_now_name_the_real_problem(run_copy, tmp_path):
    layout = RunLayout(run_copy)
    data = open(layout.model, "rb").read()
    open(layout.model, "wb").write(data[: len(data) // 3])
    result = _cli("export", "--model", run_copy, "--export-dir", str(tmp_path / "served"))
    assert result.returncode == 2 and "not a .keras archive (truncated or corrupt" in cli_error_line(result)
    open(layout.model, "wb").write(data)
    open(layout.config, "w").write("{ junk")
    result = _cli("evaluate", "--model", run_copy, "--out", str(tmp_path / "eval"), "--modes", "accuracy")
    assert result.returncode == 2 and f"{layout.config} is not a valid run config" in cli_error_line(result)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _cli("evaluate", "--model", layout.model, "--dataset", "digits", "--out", str(tmp_path / "eval"),
                  "--modes", "ood", "--ood", "mnist_5k", "--ood-data-dir", str(empty))
    assert result.returncode == 2 and f"--ood-data-dir {str(empty)!r}" in cli_error_line(result)
