"""What a semi-supervised epoch costs against a supervised one of the same recipe (plain Python, CPU/GPU).

    python bench/semi_supervised_cost.py --recipe fashion_mnist --labels-per-class 100 --labelled-batch-sizes 16 64 \
        --precision mixed_bfloat16 --out bench/results/semi_supervised_cost_fashion_mnist.json

Trains each variant for `--epochs` (default 1) with `python -m jem_tf.train` in a work directory of its own,
alternating over `--repeats` rounds, and prints the seconds per optimizer step each run measured (neither the
precision probe nor the evaluation is in it) and the ratio of the medians to the supervised run. An epoch has
the same number of steps in every variant (one pass over the training split in batches of `batch_size`; a
semi-supervised batch adds `labelled_batch_size` labelled rows), so that ratio is the ratio of epoch times.
The runs hold out no validation split (`--validation-fraction 0`), so none ends with choices made on one
(refinement settings, which take minutes on Fashion-MNIST). Run it on an otherwise idle machine; it
measures the code it is started from (`cd` to another checkout and run this file from there to compare
versions).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def train(workdir, recipe, epochs, extra):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-m", "jem_tf.train", "--recipe", recipe, "--epochs", str(epochs),
                    "--workdir", workdir, "--verbose", "0", "--overwrite", "--validation-fraction", "0", *extra],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion_mnist")
    parser.add_argument("--labels-per-class", type=int, default=100)
    parser.add_argument("--labelled-batch-sizes", type=int, nargs="+", default=[16])
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the variants (alternating)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", default="float32",
                        help="one precision for every variant (default float32; `auto` may probe differently)")
    parser.add_argument("--runs", default="runs/semi_cost", help="directory of the work directories")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    common = ["--precision", args.precision]
    variants = [("supervised", common)] + [
        (f"semi-supervised, labelled batch {n}",
         [*common, "--labels-per-class", str(args.labels_per_class), "--labelled-batch-size", str(n)])
        for n in args.labelled_batch_sizes]
    rows = []
    for round_ in range(args.repeats):
        for index, (name, extra) in enumerate(variants):
            metrics = train(os.path.join(args.runs, f"variant{index}"), args.recipe, args.epochs, extra)
            rows.append({"variant": name, "round": round_, "flags": extra, "steps": metrics["steps"],
                         "seconds_per_step": metrics["seconds_per_step"], "train_seconds": metrics["train_seconds"],
                         "precision": metrics["precision"]["precision"]})
            print(f"round {round_}: {name}: {metrics['seconds_per_step'] * 1000:.1f} ms/step over {metrics['steps']} "
                  "steps", flush=True)
    summary = {}
    for name, _ in variants:
        summary[name] = float(np.median([r["seconds_per_step"] for r in rows if r["variant"] == name]))
    base = summary[variants[0][0]]
    for name, value in summary.items():
        print(f"{name}: median {value * 1000:.1f} ms/step, {value / base:.2f}x supervised")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"recipe": args.recipe, "labels_per_class": args.labels_per_class, "epochs": args.epochs,
                       "precision": args.precision, "runs": rows,
                       "median_seconds_per_step": summary}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
