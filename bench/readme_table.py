"""The results tables of README.md and docs/, written from the evaluation reports of the runs they name.

Every number in a results table comes from one committed evaluation report (``python -m jem_tf.evaluate``'s
``report.json``, whose ``model.training`` section is the run's own ``metrics.json``), copied to
``bench/results/readme/``; ``bench/results/readme_table.json`` lists the rows: which report, which near-OOD set,
which row's training time a row is measured against, and the command that made the run. ::

    # after `python -m jem_tf.train ... --workdir RUN` and `python -m jem_tf.evaluate --model RUN --out EVAL ...`:
    python bench/readme_table.py add --data CIFAR-10 --model "classifier (\\`cifar10\\`)" --report EVAL/report.json \\
        --near-ood /data/ood/mnist_rgb.npz --command "python -m jem_tf.train --recipe cifar10 ..."
    python bench/readme_table.py write    # rewrites every results block of README.md and docs/*.md
    python bench/readme_table.py check    # exit 1 when a block or a row differs from its report (a test runs it)

A results block in a Markdown file sits between ``<!-- results-table: DATA,... -->`` (the rows' data names, or
``all``) and ``<!-- /results-table -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join("bench", "results", "readme_table.json")
REPORTS = os.path.join("bench", "results", "readme")
MARKDOWN = ["README.md", "docs"]
BLOCK = re.compile(r"(<!-- results-table: ([^>]*?) -->\n)(.*?)(<!-- /results-table -->)", re.S)
HEADER = ("| data | model | test accuracy | ECE | log p(x) AUROC: uniform / constant / permuted "
          "| exported detector AUROC: near-OOD | training time |\n| --- | --- | --- | --- | --- | --- | --- |\n")
SYNTHETIC = ("uniform", "constant", "permuted")


def numbers_of(report: dict, near_ood: str) -> dict:
    """The table's numbers in an evaluation report: test accuracy, ECE, log p(x) AUROCs against the made sets,
    the exported (validation-chosen) detector's AUROC on ``near_ood`` and the run's training seconds."""
    metrics = report["ood"]["metrics"]
    training = report["model"].get("training") or {}
    if "train_seconds" not in training:
        raise ValueError(f"report of {report['model'].get('path')!r} has no model.training.train_seconds: evaluate "
                         "the run's work directory (not a bare .keras file) with this jem-tf")
    chosen = report["ood"]["detector"]["chosen"]
    if near_ood not in metrics[chosen]:
        raise ValueError(f"near-OOD set {near_ood!r} is not in the report (sets: {sorted(metrics[chosen])})")
    return {
        "test_accuracy": report["calibration"]["uncalibrated"]["accuracy"],
        "ece": report["calibration"]["uncalibrated"]["ece"],
        "log_px_auroc": {name: metrics["log_px"][name]["auroc"] for name in SYNTHETIC},
        "detector": chosen,
        "detector_auroc_near_ood": metrics[chosen][near_ood]["auroc"],
        "train_seconds": training["train_seconds"],
    }


def load_table(root: str = ROOT) -> dict:
    with open(os.path.join(root, TABLE)) as f:
        return json.load(f)


def _row_key(row: dict) -> str:
    return f"{row['data']} / {row['model']}"


def _time(row: dict, rows: Dict[str, dict]) -> str:
    seconds = row["numbers"]["train_seconds"]
    base = row.get("time_relative_to")
    if base is None:
        return f"{seconds:,.0f} s"
    ratio = seconds / rows[base]["numbers"]["train_seconds"]
    return f"+{ratio:.2f}x" if row.get("time_added") else f"{ratio:.2f}x"


def render(table: dict, data: Optional[List[str]] = None) -> str:
    """The Markdown table of the rows whose data is in ``data`` (all rows: ``None``)."""
    rows = {_row_key(row): row for row in table["rows"]}
    lines = [HEADER]
    for row in table["rows"]:
        if data is not None and row["data"] not in data:
            continue
        n = row["numbers"]
        auroc = " / ".join(f"{n['log_px_auroc'][name]:.3f}" for name in SYNTHETIC)
        lines.append(f"| {row['data']} | {row['model']} | {100 * n['test_accuracy']:.2f} % | {n['ece']:.3f} "
                     f"| {auroc} | {n['detector_auroc_near_ood']:.3f} | {_time(row, rows)} |\n")
    return "".join(lines)


def _markdown_files(root: str) -> List[str]:
    files = []
    for entry in MARKDOWN:
        path = os.path.join(root, entry)
        if os.path.isdir(path):
            files += sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".md"))
        elif os.path.isfile(path):
            files.append(path)
    return files


def _rewritten(text: str, table: dict) -> str:
    def block(match):
        names = match.group(2).strip()
        data = None if names == "all" else [name.strip() for name in names.split(",")]
        return match.group(1) + render(table, data) + match.group(4)

    return BLOCK.sub(block, text)


def problems(root: str = ROOT) -> List[str]:
    """What differs: rows whose numbers are not their report's, and results blocks not equal to the table."""
    table, found = load_table(root), []
    keys = {_row_key(row) for row in table["rows"]}
    for row in table["rows"]:
        with open(os.path.join(root, row["report"])) as f:
            report = json.load(f)
        if numbers_of(report, row["near_ood"]) != row["numbers"]:
            found.append(f"{TABLE}: row {_row_key(row)!r} differs from {row['report']}")
        if row.get("time_relative_to") not in (None, *keys):
            found.append(f"{TABLE}: row {_row_key(row)!r} is timed against a missing row {row['time_relative_to']!r}")
    data = {row["data"] for row in table["rows"]}
    for path in _markdown_files(root):
        with open(path) as f:
            text = f.read()
        for match in BLOCK.finditer(text):
            names = match.group(2).strip()
            missing = [] if names == "all" else sorted({n.strip() for n in names.split(",")} - data)
            if missing:
                found.append(f"{os.path.relpath(path, root)}: a results block names data without rows: {missing}")
        if _rewritten(text, table) != text:
            found.append(f"{os.path.relpath(path, root)}: a results table differs from {TABLE} "
                         "(python bench/readme_table.py write)")
    return found


def add(*, data: str, model: str, report_path: str, near_ood: str, command: str,
        time_relative_to: Optional[str] = None, time_added: bool = False, run: Optional[str] = None,
        root: str = ROOT) -> dict:
    """Adds (or replaces) the row ``data / model``: copies the report under ``bench/results/readme/``, with
    ``run``'s ``metrics.json`` as its ``model.training`` when given (reports of older jem-tf versions lack it)."""
    with open(report_path) as f:
        report = json.load(f)
    if run is not None:
        with open(os.path.join(run, "metrics.json")) as f:
            report["model"]["training"] = json.load(f)
    slug = re.sub(r"[^a-z0-9]+", "_", f"{data} {model}".lower()).strip("_")[:60].rstrip("_")
    target = os.path.join(REPORTS, f"{slug}.json")
    os.makedirs(os.path.join(root, REPORTS), exist_ok=True)
    with open(os.path.join(root, target), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    row = {"data": data, "model": model, "command": command, "report": target, "near_ood": near_ood,
           "time_relative_to": time_relative_to, "time_added": time_added,
           "numbers": numbers_of(report, near_ood)}
    path = os.path.join(root, TABLE)
    table = load_table(root) if os.path.exists(path) else {"rows": []}
    rows = [r for r in table["rows"] if _row_key(r) != _row_key(row)]
    position = next((i for i, r in enumerate(table["rows"]) if _row_key(r) == _row_key(row)), len(rows))
    table["rows"] = rows[:position] + [row] + rows[position:]
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    return row


def write(root: str = ROOT) -> List[str]:
    """Rewrites every results block; returns the files changed."""
    table, changed = load_table(root), []
    for path in _markdown_files(root):
        with open(path) as f:
            text = f.read()
        new = _rewritten(text, table)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            changed.append(os.path.relpath(path, root))
    return changed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="action", required=True)
    adding = commands.add_parser("add", help="add or replace a row from an evaluation report")
    adding.add_argument("--data", required=True)
    adding.add_argument("--model", required=True)
    adding.add_argument("--report", required=True, help="python -m jem_tf.evaluate's report.json")
    adding.add_argument("--near-ood", required=True, help="the OOD set of the detector column, as the report names it")
    adding.add_argument("--command", required=True, help="the training command of the run")
    adding.add_argument("--time-relative-to", default=None, help="'DATA / MODEL' of the row to time against")
    adding.add_argument("--time-added", action="store_true", help="time shown as +Nx (on top of that row's)")
    adding.add_argument("--run", default=None, help="the run's work directory, when the report lacks its metrics")
    commands.add_parser("write", help="rewrite the results blocks of README.md and docs/*.md")
    commands.add_parser("check", help="exit 1 when a row or a results block is not current")
    args = parser.parse_args(argv)
    if args.action == "add":
        row = add(data=args.data, model=args.model, report_path=args.report, near_ood=args.near_ood,
                  command=args.command, time_relative_to=args.time_relative_to, time_added=args.time_added,
                  run=args.run)
        print(json.dumps(row["numbers"]))
    elif args.action == "write":
        print("rewrote", ", ".join(write()) or "nothing")
    else:
        found = problems()
        for line in found:
            print(line)
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
