"""Semi-supervised JEM against the same network trained on the labelled images only (plain Python, CPU/GPU).

    python bench/semi_supervised.py --recipe digits --labels-per-class 10 --seeds 0 1 2 \
        --out bench/results/semi_supervised_digits.json
    python bench/semi_supervised.py --recipe fashion_mnist --labels-per-class 100 --ood uniform constant \
        permuted mnist_5k --out bench/results/semi_supervised_fashion_mnist.json
    python bench/semi_supervised.py --summarize-only --out bench/results/semi_supervised_digits.json

For each seed: `python -m jem_tf.train --labels-per-class N` (the JEM: p(x) on every training image, the
label terms on the N per class), the same with `--px-weight 0 --pxy-weight 0 --energy-l2-weight 0` (the
labelled-only classifier: the same batches of labelled rows, the unlabelled rows weigh nothing), then
`python -m jem_tf.evaluate --modes calibration ood` on both. A run already evaluated is read, not rerun; one
that was stopped resumes from its backup (delete a run's directory to redo it); the JSON is rewritten after
every run. Prints test accuracy, NLL, ECE and OOD AUROC per seed, the mean and sample standard deviation, and
the JEM's margin. Nothing is tuned on the test split.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def run(argv):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-m", *argv], check=True, env=env, stdout=subprocess.DEVNULL)


def record(workdir):
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    report = json.load(open(os.path.join(workdir, "eval", "report.json")))
    ood = report["ood"]
    chosen = ood["detector"]["chosen"]
    return {"workdir": workdir, "test_accuracy": metrics["test_accuracy"], "test_nll": metrics["test_nll"],
            "ece": report["calibration"]["uncalibrated"]["ece"], "num_labelled": metrics["num_labelled"],
            "train_seconds": metrics["train_seconds"], "seconds_per_step": metrics["seconds_per_step"],
            "validation_accuracy": metrics["final_validation"]["accuracy"],
            "ood_auroc_log_px": {k: v["auroc"] for k, v in ood["metrics"]["log_px"].items()},
            "ood_detector": chosen, "ood_auroc_detector": {k: v["auroc"] for k, v in ood["metrics"][chosen].items()}}


def summarize(results):
    def stats(values):
        values = np.asarray(values, np.float64)
        return f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.4f}"

    for kind in ("jem", "labelled_only"):
        rows = results[kind]
        print(f"{kind}: accuracy {stats([r['test_accuracy'] for r in rows])}"
              f"  NLL {stats([r['test_nll'] for r in rows])}"
              f"  ECE {stats([r['ece'] for r in rows])}  ({rows[0]['num_labelled']} labelled images)")
        for r in rows:
            print(f"  {r['workdir']}: acc {r['test_accuracy']:.4f}  NLL {r['test_nll']:.3f}  ECE {r['ece']:.3f}  "
                  f"OOD AUROC {r['ood_detector']}: " + " / ".join(f"{k} {v:.3f}"
                                                               for k, v in r["ood_auroc_detector"].items()))
    margins = [a["test_accuracy"] - b["test_accuracy"] for a, b in zip(results["jem"], results["labelled_only"])]
    print(f"JEM margin over the labelled-only classifier: {stats(margins)} (per seed "
          + ", ".join(f"{m * 100:+.2f}" for m in margins) + " points)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits")
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/semi", help="directory of the work directories")
    parser.add_argument("--ood", nargs="+", default=["uniform", "constant", "permuted"])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train flags")
    parser.add_argument("--summarize-only", action="store_true", help="read the runs, train nothing")
    parser.add_argument("--out", help="write the records as JSON here")
    args = parser.parse_args(argv)
    results = {"jem": [], "labelled_only": []}
    for seed in args.seeds:
        for kind, flags in (("jem", []), ("labelled_only", ["--px-weight", "0", "--pxy-weight", "0",
                                                             "--energy-l2-weight", "0"])):
            workdir = os.path.join(args.runs, f"{args.recipe}_{args.labels_per_class}pc_{kind}_s{seed}")
            report = os.path.join(workdir, "eval", "report.json")
            if not args.summarize_only and not os.path.exists(report):
                if not os.path.exists(os.path.join(workdir, "metrics.json")):
                    # A run that was stopped resumes from its backup (same flags); an empty one starts.
                    run(["jem_tf.train", "--recipe", args.recipe, "--labels-per-class", str(args.labels_per_class),
                         "--seed", str(seed), "--workdir", workdir, "--verbose", "0", *flags, *args.extra])
                run(["jem_tf.evaluate", "--model", workdir, "--out", os.path.join(workdir, "eval"), "--modes",
                     "calibration", "ood", "--ood", *args.ood])
            if os.path.exists(report):
                results[kind].append(record(workdir))
                write(args, results)  # after every run: a long measurement may span sessions
    if all(results.values()):
        summarize(results)


def write(args, results):
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"recipe": args.recipe, "labels_per_class": args.labels_per_class, "seeds": args.seeds,
                       **results}, f, indent=2)
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
