"""jem_tf.tune (`python -m jem_tf.tune`): a search through the CLI, and its one-line errors."""

import json

import pytest

from jem_tf import tune
from jem_tf.run.config import load_recipe


@pytest.mark.integration
def test_tune_cli(tmp_path, capsys):
    from jem_tf import tune

    code = tune.main(["--recipe", "digits", "--tuner", "random", "--max-trials", "1", "--directory",
                      str(tmp_path), "--epochs", "1", "--width", "4", "--sgld-steps", "2", "--buffer-size", "100",
                      "--fix", "sgld_steps,warmup_steps"])
    assert code == 0
    out = capsys.readouterr().out
    summary = json.load(open(tmp_path / "summary.json"))
    best = summary["best"]
    assert summary["num_trials"] == 1 and best["status"] == "COMPLETED" and "1 trials (0 failed)" in out
    assert f"best val_accuracy = {best['score']:.4f}" in out
    # The best recipe is the digits recipe with the trial's values and the command's overrides.
    recipe = load_recipe(str(tmp_path / "best_recipe.json"))
    assert recipe.width == 4 and recipe.sgld_steps == 2 and recipe.epochs == 1
    for name, value in best["hyperparameters"].items():
        assert getattr(recipe, name) == pytest.approx(value)


@pytest.mark.parametrize("argv, message", [
    (["--tuner", "evolution"], "invalid choice: 'evolution'"),
    (["--max-trials", "0"], "--max-trials must be >= 1; received 0"),
    (["--fix", "momentum"], "Cannot fix 'momentum'"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
])
def test_tune_cli_errors(argv, message, tmp_path, capsys):
    from jem_tf import tune

    with pytest.raises(SystemExit) as exit_info:
        tune.main(argv + ["--directory", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_tune_without_keras_tuner_is_one_line_naming_the_extra(monkeypatch, capsys):
    import sys

    from jem_tf import tune

    monkeypatch.setitem(sys.modules, "keras_tuner", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "jem_tf.training.tuning")
    assert tune.main(["--recipe", "digits", "--max-trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m jem_tf.tune: error: Hyperparameter search (python -m jem_tf.tune, "
                   "jem_tf.training.tuning) needs keras-tuner, an optional dependency of jem-tf that is not installed: "
                   "pip install 'jem-tf[tune]'"]


def test_tune_reports_a_bad_search_directory_or_space_file_in_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    bad_json = tmp_path / "space.json"
    bad_json.write_text("{ nope")
    for argv, message in ((["--directory", str(a_file)], f"--directory {str(a_file)!r} is a file, not a directory"),
                          (["--space", str(bad_json)], "Expecting property name enclosed in double quotes"),
                          (["--space", str(tmp_path / "none.json")], "No such file or directory")):
        with pytest.raises(SystemExit) as exit_info:
            tune.main(["--directory", str(tmp_path / "search"), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "search").exists()
