"""Time to quality of three roads to a JEM: the plain classifier, the classifier + its conversion, and the JEM
trained from scratch; test accuracy and energy gap against training time.

    python bench/conversion.py --dataset digits --out bench/results/conversion_digits.json
    python bench/conversion.py --dataset fashion_mnist --out bench/results/conversion_fashion_mnist.json \
        --reuse classifier=runs/conv_bench/classifier_tta.json:classifier \
        --reuse scratch=bench/results/fashion_time_to_accuracy.json:fast
    python bench/conversion.py --recipe cifar10 --dataset CIFAR10_IMAGE_FOLDER --scratch-budget \
        --out bench/results/conversion_cifar10.json

Trains, one after the other in this process (never two at once), with the CLI's pipeline
(`jem_tf.training.pipeline.train_and_evaluate`; each run leaves a normal work directory under --workdir-base):

* `classifier`: the RECIPE recipe with `--px-weight 0 --pxy-weight 0 --energy-l2-weight 0` (same epochs);
* `converted`: the RECIPE_finetune recipe with `--init-from` the classifier's work directory;
* `scratch`: the RECIPE recipe (the JEM from scratch); with `--scratch-budget`, stopped once its training time
  reaches that of the classifier plus the conversion (the question: what does the same time buy from scratch?).

RECIPE defaults to DATASET (digits, fashion_mnist); `--dataset` may also be an image folder (e.g. CIFAR-10's
JPEGs, with `--recipe cifar10`).

`--reuse NAME=JSON:KEY` takes a run from an earlier benchmark's JSON (`bench/time_to_accuracy.py` writes the
same records) instead of training it: the Fashion-MNIST JEM from scratch takes about 40 minutes. `--reuse
NAME=WORKDIR` takes a finished CLI run (`python -m jem_tf.train`) from its `metrics.json`: its end point only (test
accuracy at its training time; the figure marks it without a curve). `--scratch-set FIELD=VALUE` changes a field of
the from-scratch run's recipe (e.g. `normalization=layer`: a network without batch norm). Every probe
(every --probe-every-steps steps and at every epoch end; probes excluded from the time) records the training
seconds so far, the test accuracy and the running mean of the epoch's energy gap. Each record also has
`wall_seconds`: the whole `train_and_evaluate` call (data split, class-Gaussian fit, precision probe,
classifier loading, training, final evaluation and save). The figure's x axis is training time divided by
the classifier's training time *measured on the same machine* (a reused run is scaled by the classifier of
its own JSON), so runs from two machines share one axis; the JSON keeps the seconds. The test split is only
reported, never used to choose anything.
"""

import argparse
import json
import os
import platform
import sys
import time

from time_to_accuracy import make_probe

RUNS = ("classifier", "converted", "scratch")
COLORS = {"classifier": "tab:orange", "converted": "tab:blue", "scratch": "tab:green"}
LABELS = {"classifier": "classifier", "converted": "classifier + conversion", "scratch": "JEM from scratch"}


def machine():
    import tensorflow as tf

    return {"platform": platform.platform(), "processor": _cpu_name(), "cpus": len(os.sched_getaffinity(0)),
            "tensorflow": tf.__version__, "python": sys.version.split()[0]}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        flags = open("/proc/cpuinfo").read()
        return (names[0] if names else platform.processor()) + (" (AMX)" if "amx_tile" in flags else " (no AMX)")
    except OSError:
        return platform.processor()


def train_run(name, config, workdir, data, every_steps, budget_s=None):
    from jem_tf.training.pipeline import train_and_evaluate

    print(f"== {name}: {workdir}" + (f" (budget {budget_s:.0f} s of training)" if budget_s else ""), flush=True)
    probe = make_probe((data.x_test, data.y_test), every_steps, budget_s)
    start = time.perf_counter()
    metrics = train_and_evaluate(config, workdir, data=data, verbose=2, callbacks=[probe])
    return {"config": config.to_dict(), "workdir": workdir, "points": probe.points,
            "train_seconds_excluding_probes": probe.train_seconds(), "probe_seconds": probe.probe_s,
            "wall_seconds": time.perf_counter() - start - probe.probe_s, "metrics": metrics, "machine": machine()}


def reused_run(spec):
    """``(record, classifier seconds of the same JSON)`` for ``PATH:KEY``, or ``(record, None)`` for a CLI work
    directory (its end point only)."""
    if os.path.isdir(spec):
        metrics = json.load(open(os.path.join(spec, "metrics.json")))
        config = json.load(open(os.path.join(spec, "config.json")))
        point = {"train_seconds": metrics["train_seconds"], "step": metrics["steps"], "epoch": metrics["epochs"],
                 "epoch_end": True, "test_accuracy": metrics["test_accuracy"], "test_nll": metrics["test_nll"],
                 "energy_gap": None, "e_data": None}
        return {"config": config, "workdir": spec, "points": [point], "end_point_only": True,
                "train_seconds_excluding_probes": metrics["train_seconds"], "probe_seconds": 0.0,
                "wall_seconds": None, "metrics": metrics, "machine": machine(), "reused_from": spec}, None
    path, _, key = spec.rpartition(":")
    record = json.load(open(path))
    run = dict(record["runs"][key])
    run.setdefault("machine", record.get("machine"))
    run["reused_from"] = f"{path}:{key}"
    classifier = record["runs"].get("classifier")
    return run, (classifier or {}).get("train_seconds_excluding_probes")


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, gap) = plt.subplots(1, 2, figsize=(11, 4))
    for name in RUNS:
        if name not in results:
            continue
        run = results[name]
        unit = run["classifier_seconds_same_machine"]
        offset = results["classifier"]["train_seconds_excluding_probes"] if name == "converted" else 0.0
        points = [p for i, p in enumerate(run["points"]) if i == 0 or p["step"] != run["points"][i - 1]["step"]]
        x = [(offset + p["train_seconds"]) / unit for p in points]
        label = LABELS[name] + (" (earlier run, other machine)" if run.get("reused_from") and
                                run["machine"] != results["classifier"].get("machine") else "")
        marker = "o" if run.get("end_point_only") else "."
        if run.get("end_point_only"):
            label += " (end point)"
        acc.plot(x, [100 * p["test_accuracy"] for p in points], marker=marker, label=label, color=COLORS[name])
        if any(p["energy_gap"] is not None for p in points):
            gap.plot(x, [p["energy_gap"] for p in points], marker=".", label=label, color=COLORS[name])
    low = min(100 * p["test_accuracy"] for run in results.values() for p in run["points"][len(run["points"]) // 4:])
    acc.set(xlabel="training time / the classifier's training time", ylabel="test accuracy (%)", title=title)
    acc.set_ylim(max(0, low - 2), None)
    gap.set(xlabel="training time / the classifier's training time", ylabel="energy gap: E(data) - E(samples)",
            title="energy gap (0: the samples have the data's energy)")
    gap.axhline(0, color="grey", lw=0.5)
    for axis in (acc, gap):
        axis.axvline(1, color="grey", lw=0.5, ls=":")
        axis.axvline(2, color="grey", lw=0.5, ls=":")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits", help="digits, fashion_mnist or an image folder")
    parser.add_argument("--recipe", default=None, help="the recipes RECIPE and RECIPE_finetune (default: --dataset)")
    parser.add_argument("--scratch-budget", action="store_true",
                        help="stop the JEM from scratch at the classifier's plus the conversion's training time")
    parser.add_argument("--scratch-budget-s", type=float, default=None,
                        help="stop the JEM from scratch after this many seconds of training instead")
    parser.add_argument("--out", required=True, help="JSON file (the figure: the same name with .png)")
    parser.add_argument("--workdir-base", default=None, help="default: runs/conversion_DATASET")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--probe-every-steps", type=int, default=None,
                        help="default: every half epoch for fashion_mnist, epoch ends only for digits")
    parser.add_argument("--reuse", action="append", default=[], metavar="NAME=JSON:KEY",
                        help="take run NAME (classifier, converted or scratch) from an earlier JSON instead of "
                             "training it")
    parser.add_argument("--scratch-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of the from-scratch run's recipe (VALUE as JSON, else a string)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    args = parser.parse_args(argv)
    figure = os.path.splitext(args.out)[0] + ".png"
    recipe = args.recipe or args.dataset
    title = {"digits": "digits (8x8)", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 (JPEG images)"}.get(
        recipe, recipe)
    if args.plot_only:
        plot(json.load(open(args.out))["runs"], figure, title)
        return 0
    reuse = dict(spec.split("=", 1) for spec in args.reuse)
    scratch_fields = {}
    for spec in args.scratch_set:
        field, _, value = spec.partition("=")
        try:
            scratch_fields[field] = json.loads(value)
        except ValueError:
            scratch_fields[field] = value
    if set(reuse) - set(RUNS):
        parser.error(f"--reuse takes NAME=JSON:KEY with NAME one of {', '.join(RUNS)}")

    from jem_tf.data import load_dataset
    from jem_tf.run.config import load_recipe

    base = args.workdir_base or f"runs/conversion_{recipe}"
    every = args.probe_every_steps if args.probe_every_steps is not None else (
        422 if args.dataset == "fashion_mnist" else 0)
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    overrides = {"data_dir": args.data_dir, "dataset": args.dataset}
    results = {}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:  # after every run: a partial result survives an interruption
            json.dump({"machine": machine(), "runs": results}, f, indent=2)

    for name in RUNS:
        if name in reuse:
            run, unit = reused_run(reuse[name])
        else:
            if name == "classifier":
                config = load_recipe(recipe).replace(px_weight=0.0, pxy_weight=0.0, energy_l2_weight=0.0,
                                                     **overrides)
            elif name == "converted":
                config = load_recipe(f"{recipe}_finetune").replace(
                    init_from=results["classifier"]["workdir"], **overrides)
            else:
                config = load_recipe(recipe).replace(**overrides, **scratch_fields).validate()
            budget = None
            if name == "scratch" and args.scratch_budget_s:
                budget = args.scratch_budget_s
            elif name == "scratch" and args.scratch_budget:
                budget = sum(results[r]["train_seconds_excluding_probes"] for r in ("classifier", "converted"))
            run, unit = train_run(name, config, os.path.join(base, name), data, every, budget), None
        # The unit of the figure's axis: the classifier's training time on the machine this run was timed on.
        run["classifier_seconds_same_machine"] = unit or (
            run["train_seconds_excluding_probes"] if name == "classifier"
            else results["classifier"]["train_seconds_excluding_probes"])
        results[name] = run
        save()
        plot(results, figure, title)

    clf = results["classifier"]
    print(f"{'run':<11} {'train s':>8} {'wall s':>8} {'x classifier':>12} {'test acc':>8} {'energy gap':>10}")
    for name, run in results.items():
        last = run["points"][-1]
        gap = "-" if last["energy_gap"] is None else f"{last['energy_gap']:.3f}"
        ratio = run["train_seconds_excluding_probes"] / run["classifier_seconds_same_machine"]
        wall = run.get("wall_seconds")
        print(f"{name:<11} {run['train_seconds_excluding_probes']:>8.0f} {wall or float('nan'):>8.0f} {ratio:>12.2f} "
              f"{run['metrics']['test_accuracy']:>8.4f} {gap:>10}" + ("  (reused)" if run.get("reused_from") else ""))
    if "converted" in results:
        total = clf["train_seconds_excluding_probes"] + results["converted"]["train_seconds_excluding_probes"]
        print(f"classifier + conversion: {total:.0f} s = {total / clf['train_seconds_excluding_probes']:.2f}x "
              "the classifier's training time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
