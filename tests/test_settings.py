"""jem_tf.evaluation.settings: EvaluationConfig's defaults (the CLI's) and its checks."""

import os

import pytest

from jem_tf import evaluate as evaluate_cli
from jem_tf import evaluation as ev


@pytest.fixture(scope="module")
def trained(evaluation_jem):
    """The tiny trained model these tests share: conftest's ``evaluation_jem``, trained once per test run."""
    return evaluation_jem


def test_evaluation_config_defaults_are_the_cli_defaults_and_bad_settings_raise(trained, tmp_path):
    args = evaluate_cli.build_parser().parse_args(["--model", "m", "--out", "o"])
    cli = evaluate_cli.evaluation_config_from_args(args)
    assert cli == ev.EvaluationConfig().replace(pgd_eps=ev.DEFAULT_PGD_EPS)  # no budgets given: the CLI's
    assert ev.EvaluationConfig().validate().modes == ev.DEFAULT_MODES
    from jem_tf.evaluation import suite  # a submodule: not an attribute until imported

    assert tuple(suite.MODE_TABLE) == ev.MODES
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
