"""Robustness of a JEM and its plain classifier under PGD, plain / refined (non-adaptive) / refined (BPDA).

    python bench/robustness.py --jem RUN_DIR --classifier RUN_DIR --converted RUN_DIR --tag digits --examples 360

Each model refines with its saved settings (chosen on its run's validation split at the end of training);
a model saved without them, or with ``--refinement choose``, gets them chosen now on the run's validation
split (never on test images).
Prints one table and the issue-26 target checks, and writes bench/results/robustness_TAG.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jem_tf.choices import REFINEMENT_SOURCES
from jem_tf.evaluation.refinement_choice import resolve_refinement
from jem_tf.evaluation.robustness import DEFAULT_EOT_SAMPLES, evaluate_robustness
from jem_tf.run.model_files import load_trained_model
from jem_tf.run.splits import held_out_split, load_run_dataset

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measure(path: str, *, examples: int, linf, l2, steps: int, seed: int, data_dir, eot_samples: int,
            refinement_source: str) -> dict:
    model, config = load_trained_model(path)
    data = load_run_dataset(config.dataset, config=config, data_dir=data_dir)
    x_val, y_val, split = held_out_split(config.dataset, config=config, data=data)
    if split != "validation":
        x_val = y_val = None
    saved = model.refinement is not None
    started = time.perf_counter()
    refinement = resolve_refinement(model, refinement_source, val_images=x_val, val_labels=y_val, seed=seed)
    chose_s = time.perf_counter() - started
    started = time.perf_counter()
    report = evaluate_robustness(model, data.x_test, data.y_test, eps={"linf": tuple(linf), "l2": tuple(l2)},
                                 steps=steps, refinement=refinement, max_examples=examples, seed=seed,
                                 eot_samples=eot_samples)
    return {"path": os.path.abspath(path), "dataset": config.dataset, "px_weight": model.px_weight,
            "refinement_saved_with_model": saved, "refinement_choice_seconds": round(chose_s, 1),
            "attack_seconds": round(time.perf_counter() - started, 1), "robustness": report}


def table(results: dict) -> list:
    budgets = [k for k in next(iter(results.values()))["robustness"] if k != "settings"]
    lines = ["| model | " + " | ".join(budgets) + " |", "| --- |" + " --- |" * len(budgets)]
    for name, r in results.items():
        cells = []
        for b in budgets:
            v = r["robustness"][b]
            cells.append(f"{v['accuracy']:.3f} / {v['accuracy_refined']:.3f}"
                         + (f" / {v['accuracy_refined_bpda']:.3f} / {v['accuracy_refined_worst']:.3f}"
                            if "accuracy_refined_bpda" in v else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def targets(results: dict) -> dict:
    """The issue-26 checks: refined clean >= plain clean - 1 point; refined (non-adaptive) >= plain at every
    budget; the JEM >= the classifier at every budget, plain and refined."""
    checks = {}
    for name, r in results.items():
        rob = r["robustness"]
        checks[f"{name}: refined clean >= plain clean - 0.01"] = (
            rob["clean"]["accuracy_refined"] >= rob["clean"]["accuracy"] - 0.01)
        checks[f"{name}: refined >= plain at every budget (non-adaptive)"] = all(
            v["accuracy_refined"] >= v["accuracy"] for k, v in rob.items() if k not in ("settings", "clean"))
    for name in ("jem", "converted"):
        if {name, "classifier"} <= set(results):
            jem, clf = results[name]["robustness"], results["classifier"]["robustness"]
            budgets = [k for k in jem if k not in ("settings", "clean")]
            for key in ("accuracy", "accuracy_refined"):
                checks[f"{name} >= classifier at every budget ({key})"] = all(jem[b][key] >= clf[b][key]
                                                                             for b in budgets)
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jem", required=True, help="work directory of the JEM run")
    parser.add_argument("--classifier", default=None, help="work directory of the same recipe with --px-weight 0")
    parser.add_argument("--converted", default=None, help="work directory of the classifier's conversion run")
    parser.add_argument("--tag", required=True, help="name of the result file: robustness_TAG.json")
    parser.add_argument("--examples", type=int, default=360)
    parser.add_argument("--linf", type=float, nargs="*", default=[0.01, 0.02, 0.05])
    parser.add_argument("--l2", type=float, nargs="*", default=[0.5, 1.0])
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--eot-samples", type=int, default=DEFAULT_EOT_SAMPLES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refinement", choices=REFINEMENT_SOURCES, default="model",
                        help="model: the settings saved with the model (chosen on validation when none); choose: "
                             "chosen anew on the run's validation split with the library's current defaults")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    results = {}
    for name, path in (("jem", args.jem), ("classifier", args.classifier), ("converted", args.converted)):
        if path:
            results[name] = measure(path, examples=args.examples, linf=args.linf, l2=args.l2, steps=args.pgd_steps,
                                    seed=args.seed, data_dir=args.data_dir, eot_samples=args.eot_samples,
                                    refinement_source=args.refinement)
            r = results[name]["robustness"]["settings"]["refinement"]
            print(f"{name}: refinement {r['n_steps']} steps, step {r['step_size']:g}, noise {r['noise_std']:g}, "
                  f"grad clamp {r['grad_clamp']} ({r['source']}); attacks {results[name]['attack_seconds']} s")
    print("accuracy: plain / refined (non-adaptive attack) / refined (BPDA attack) / refined (worst of both)")
    for line in table(results):
        print(line)
    checks = targets(results)
    for check, ok in checks.items():
        print(f"{'met   ' if ok else 'MISSED'} {check}")
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, f"robustness_{args.tag}.json")
    with open(out, "w") as f:
        json.dump({"command": "python bench/robustness.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "results": results, "targets": checks}, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
