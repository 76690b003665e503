"""Time to accuracy on Fashion-MNIST: test accuracy and energy gap against training wall-clock time.

    python bench/time_to_accuracy.py --out bench/results/fashion_time_to_accuracy.json
    python bench/time_to_accuracy.py --runs fast classifier --workdir-base runs/tta   # a subset

Trains, one after the other in this process (never two at once), with the CLI's pipeline
(`jem_tf.training.pipeline.train_and_evaluate`, so every run also leaves a normal work directory with
`metrics.json` and `model.keras` under --workdir-base):

* `fast`: the `fashion_mnist` recipe (JEM++-style: class-Gaussian chain starts, 5 proximal SGLD steps);
* `classifier`: the same recipe with `--px-weight 0 --pxy-weight 0 --energy-l2-weight 0` (same epochs);
* `paper`: the `fashion_mnist_jem_paper` recipe (20 SGLD steps from uniform noise), stopped after the
  training time the `fast` run took (`--paper-budget-s` to set it), so both are compared at equal time.

Every --probe-every-steps steps and at every epoch end a probe records the training time so far (probes
excluded), the step, the test accuracy and NLL (clean test images), and the running mean of the epoch's
energy gap (mean E(data) - mean E(samples); 0 when the samples have the data's energy). The test split is
only reported here, never used to choose anything. Writes --out (JSON) and the same name with .png (two
panels: accuracy and energy gap against minutes).
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

RUNS = ("fast", "classifier", "paper")


def make_probe(test_data, every_steps, budget_s):
    """A Keras callback that records the curve and stops training once the time budget is spent (defined
    here, inside a function, so that `--help` needs no TensorFlow)."""
    import keras

    from jem_tf.metrics import calibration_metrics

    class Probe(keras.callbacks.Callback):
        def __init__(self, test_data, every_steps, budget_s):
            super().__init__()
            self.test_ds, self.every_steps, self.budget_s = test_data, every_steps, budget_s
            self.points, self.probe_s, self.start, self.epoch = [], 0.0, None, 0

        def train_seconds(self):
            return time.perf_counter() - self.start - self.probe_s

        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def _probe(self, logs, epoch_end):
            t0 = time.perf_counter()
            seconds = self.train_seconds()
            # predict, not evaluate: evaluate would reset the training metrics the epoch's logs report.
            test = calibration_metrics(self.model.predict(self.test_ds[0], batch_size=500, verbose=0),
                                       self.test_ds[1])
            self.points.append({
                "train_seconds": seconds, "step": int(self.model.optimizer.iterations.numpy()),
                "epoch": self.epoch + (1 if epoch_end else 0), "epoch_end": epoch_end,
                "test_accuracy": test["accuracy"], "test_nll": test["nll"],
                "energy_gap": float(np.ravel(logs["energy_gap"])[0]) if logs and "energy_gap" in logs else None,
                "e_data": float(np.ravel(logs["e_data"])[0]) if logs and "e_data" in logs else None,
            })
            print(f"  probe: {seconds / 60:.1f} min, step {self.points[-1]['step']}, test accuracy "
                  f"{self.points[-1]['test_accuracy']:.4f}, energy gap {self.points[-1]['energy_gap']}",
                  flush=True)
            self.probe_s += time.perf_counter() - t0

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if self.every_steps and step % self.every_steps == 0:
                self._probe(logs, epoch_end=False)
            if self.budget_s is not None and self.train_seconds() >= self.budget_s:
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            if self.points and self.points[-1]["step"] == int(self.model.optimizer.iterations.numpy()):
                self.points[-1].update(epoch=epoch + 1, epoch_end=True)  # probed at this step already
            else:
                self._probe(logs, epoch_end=True)

    return Probe(test_data, every_steps, budget_s)


def run_one(name, config, workdir, data, test_data, every_steps, budget_s):
    from jem_tf.training.pipeline import train_and_evaluate

    print(f"== {name}: {workdir} (budget {budget_s and round(budget_s)} s)", flush=True)
    probe = make_probe(test_data, every_steps, budget_s)
    metrics = train_and_evaluate(config, workdir, data=data, verbose=2, callbacks=[probe])
    return {"config": config.to_dict(), "workdir": workdir, "points": probe.points,
            "train_seconds_excluding_probes": probe.train_seconds() if probe.start else None,
            "probe_seconds": probe.probe_s, "metrics": metrics}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fast": "tab:blue", "classifier": "tab:orange", "paper": "tab:green"}
    fig, (acc, gap) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in results.items():
        points = [p for i, p in enumerate(result["points"]) if i == 0 or p["step"] != result["points"][i - 1]["step"]]
        minutes = [p["train_seconds"] / 60 for p in points]
        acc.plot(minutes, [100 * p["test_accuracy"] for p in points], marker=".", label=name, color=colors[name])
        if any(p["energy_gap"] is not None for p in points):
            gap.plot(minutes, [p["energy_gap"] for p in points], marker=".", label=name, color=colors[name])
    acc.set(xlabel="training time (min, 2-core CPU)", ylabel="test accuracy (%)", title="Fashion-MNIST")
    acc.set_ylim(60, 95)
    gap.set(xlabel="training time (min)", ylabel="energy gap: E(data) - E(samples)", title="energy gap")
    gap.axhline(0, color="grey", lw=0.5)
    for axis in (acc, gap):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/fashion_time_to_accuracy.json")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--workdir-base", default="runs/time_to_accuracy")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: Debian's package or tfds)")
    parser.add_argument("--probe-every-steps", type=int, default=422, help="0: probe at epoch ends only")
    parser.add_argument("--paper-budget-s", type=float, default=None,
                        help="training seconds of the paper run (default: what the fast run took)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the recipes' epochs (e.g. 1 for a smoke run)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.load(open(args.out))["runs"], os.path.splitext(args.out)[0] + ".png")
        return 0

    import tensorflow as tf

    from jem_tf.data import load_dataset
    from jem_tf.run.config import load_recipe

    data = load_dataset("fashion_mnist", data_dir=args.data_dir)
    overrides = {"data_dir": args.data_dir} | ({"epochs": args.epochs} if args.epochs else {})
    configs = {
        "fast": load_recipe("fashion_mnist").replace(**overrides),
        "classifier": load_recipe("fashion_mnist").replace(px_weight=0.0, pxy_weight=0.0, energy_l2_weight=0.0,
                                                          **overrides),
        "paper": load_recipe("fashion_mnist_jem_paper").replace(**overrides),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = {}
    budget = args.paper_budget_s
    for name in args.runs:
        if name == "paper" and budget is None and "fast" in results:
            budget = results["fast"]["train_seconds_excluding_probes"]
        result = run_one(name, configs[name], os.path.join(args.workdir_base, name), data, (data.x_test, data.y_test),
                         args.probe_every_steps, budget if name == "paper" else None)
        result["budget_s"] = budget if name == "paper" else None
        results[name] = result
        record = {"machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                              "tensorflow": tf.__version__, "python": sys.version.split()[0]},
                  "runs": results}
        with open(args.out, "w") as f:  # after every run: a partial result survives an interruption
            json.dump(record, f, indent=2)
        plot(results, os.path.splitext(args.out)[0] + ".png")
    print(f"{'run':<11} {'train min':>9} {'epochs':>6} {'test acc':>8} {'test NLL':>8} {'energy gap':>10}")
    for name, result in results.items():
        last = result["points"][-1]
        gap = "-" if last["energy_gap"] is None else f"{last['energy_gap']:.3f}"
        print(f"{name:<11} {result['train_seconds_excluding_probes'] / 60:>9.1f} {last['epoch']:>6} "
              f"{result['metrics']['test_accuracy']:>8.4f} {result['metrics']['test_nll']:>8.4f} {gap:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
