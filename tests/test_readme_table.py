"""bench/readme_table.py: every results table of README.md and docs/ is its committed reports' numbers."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def readme_table():
    spec = importlib.util.spec_from_file_location("readme_table", os.path.join(ROOT, "bench", "readme_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(accuracy, ece, train_seconds, near=0.9):
    sets = {"uniform": {"auroc": 1.0}, "constant": {"auroc": 0.5}, "permuted": {"auroc": 0.75},
            "mnist": {"auroc": near}}
    return {"model": {"path": "runs/x", "training": {"train_seconds": train_seconds}},
            "calibration": {"uncalibrated": {"accuracy": accuracy, "ece": ece}},
            "ood": {"metrics": {"log_px": sets, "max_softmax": {"mnist": {"auroc": 0.8}}},
                    "detector": {"chosen": "log_px"}}}


def test_the_committed_tables_are_their_reports_numbers(readme_table):
    assert readme_table.problems() == []
    table = readme_table.load_table()
    assert {row["data"] for row in table["rows"]} >= {"CIFAR-10"}
    for row in table["rows"]:  # each row names the command that made its run
        assert row["command"].startswith("python -m jem_tf.train")


def test_add_write_and_check_round_trip(readme_table, tmp_path):
    root = tmp_path
    (root / "docs").mkdir()
    (root / "README.md").write_text("intro\n<!-- results-table: all -->\nstale\n<!-- /results-table -->\nend\n")
    (root / "docs" / "x.md").write_text("<!-- results-table: B -->\n<!-- /results-table -->\n")
    for name, report in {"a": _report(0.9, 0.05, 100.0), "b": _report(0.8, 0.02, 50.0, near=0.95)}.items():
        (root / f"{name}.json").write_text(json.dumps(report))
    readme_table.add(data="A", model="classifier", report_path=str(root / "a.json"), near_ood="mnist",
                     command="python -m jem_tf.train --recipe a", root=str(root))
    row = readme_table.add(data="B", model="JEM", report_path=str(root / "b.json"), near_ood="mnist",
                           command="python -m jem_tf.train --recipe b", time_relative_to="A / classifier",
                           time_added=True, root=str(root))
    assert row["numbers"] == {"test_accuracy": 0.8, "ece": 0.02, "log_px_auroc": {"uniform": 1.0, "constant": 0.5,
                              "permuted": 0.75}, "detector": "log_px", "detector_auroc_near_ood": 0.95,
                              "train_seconds": 50.0}
    assert len(readme_table.problems(str(root))) == 2  # both blocks stale
    assert readme_table.write(str(root)) == ["README.md", os.path.join("docs", "x.md")]
    assert readme_table.problems(str(root)) == []
    readme = (root / "README.md").read_text()
    assert "| A | classifier | 90.00 % | 0.050 | 1.000 / 0.500 / 0.750 | 0.900 | 100 s |" in readme
    assert "| B | JEM | 80.00 % | 0.020 | 1.000 / 0.500 / 0.750 | 0.950 | +0.50x |" in readme
    assert readme.startswith("intro\n") and readme.endswith("end\n") and "stale" not in readme
    assert "| A |" not in (root / "docs" / "x.md").read_text()  # a block shows only the data it names

    # A number edited by hand, in the README or in the table, is caught.
    (root / "README.md").write_text(readme.replace("90.00 %", "91.00 %"))
    assert any("README.md" in line for line in readme_table.problems(str(root)))
    readme_table.write(str(root))
    table = json.loads((root / readme_table.TABLE).read_text())
    table["rows"][0]["numbers"]["ece"] = 0.01
    (root / readme_table.TABLE).write_text(json.dumps(table))
    assert any("'A / classifier' differs" in line for line in readme_table.problems(str(root)))
    (root / "docs" / "x.md").write_text("<!-- results-table: B,Z -->\n<!-- /results-table -->\n")
    assert any("names data without rows: ['Z']" in line for line in readme_table.problems(str(root)))


def test_a_report_without_the_runs_training_time_is_refused(readme_table, tmp_path):
    report = _report(0.9, 0.05, 1.0)
    del report["model"]["training"]
    (tmp_path / "r.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="no model.training.train_seconds"):
        readme_table.add(data="A", model="m", report_path=str(tmp_path / "r.json"), near_ood="mnist",
                         command="python -m jem_tf.train", root=str(tmp_path))
    with pytest.raises(ValueError, match="near-OOD set 'svhn' is not in the report"):
        readme_table.numbers_of(_report(0.9, 0.05, 1.0), "svhn")
