"""How fast is the paper's CIFAR-10 recipe on a GPU: seconds per JEM step and per plain-classifier step.

    python bench/cifar10_gpu.py --dataset cifar10 --data-dir ~/tensorflow_datasets --out bench/results/cifar10_gpu.json
    python bench/cifar10_gpu.py --synthetic --out bench/results/cifar10_gpu.json     # a machine without the data
    python bench/cifar10_gpu.py --synthetic --backbone wrn-10-1 --steps 3 --warmup 1 --strategies default \\
        --precisions float32                                                          # a smoke run on a CPU

Trains the bundled recipe `cifar10_wrn28_10` (WRN-28-10 without normalisation, global batch 64, 20 SGLD steps,
buffer 10,000, crop+flip augmentation, Adam; trainers/cifar10_wrn28_10.json) unchanged except for the number of
steps, through the library's own pieces, as `jem_tf.training.pipeline.train_and_evaluate` wires them: the run's data
(`jem_tf.run.splits.load_run_dataset`, `run_splits`: the recipe's 10 % validation split is held out), the strategy
(`jem_tf.sampling.distribution.make_strategy`), the precision
(`jem_tf.training.factories.resolve_config_precision`, probed
outside the strategy's scope at the per-replica batch), the model and optimizer (`build_jem`, `compile_jem`,
under the strategy's scope) and the input pipeline (`build_datasets`: seeded epochs, augmentation on the fly),
then `model.fit`. No validation pass, checkpoint, sample grid or work directory: only the training steps.

For every strategy in --strategies (`default`: one device; `mirrored`: MirroredStrategy over all local GPUs)
and precision in --precisions (`auto`: the library's measured probe picks float32 or mixed_bfloat16; the
record says which), one subprocess of this script (so that device and precision setup cannot leak from one
run into the next) trains --warmup + --steps JEM steps and then as many steps of the plain classifier (the
same recipe with px_weight, pxy_weight and energy_l2_weight 0: no SGLD), at steps_per_execution 1. A Keras
callback times every step (time.perf_counter from on_train_batch_begin to on_train_batch_end, synchronised by
reading the step's loss); the first --warmup steps (tracing, allocation) are not counted, nor is an epoch's
last, smaller batch. The table gives the median and 90th percentile seconds per step, images per second
(global batch / median step) and the JEM / classifier ratio; --out writes every record and the machine (TF
version, GPU names and compute capabilities, CPU count) as JSON.

Without a GPU the figures are CPU figures (the script says so) and `mirrored` needs more than one device; a
--backbone other than the recipe's is for smoke tests only, and its figures are marked as not the recipe's.
Until this script has run on a GPU, the README says that the recipe's speed on a GPU is unmeasured.
"""

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

RECIPE = "cifar10_wrn28_10"
STRATEGIES = ("default", "mirrored")
PRECISIONS = ("float32", "auto", "mixed_bfloat16", "mixed_float16")
CLASSIFIER = {"px_weight": 0.0, "pxy_weight": 0.0, "energy_l2_weight": 0.0}  # the p(x) terms off: no SGLD
SYNTHETIC = {"num_train": 5000, "num_test": 1000, "shape": (32, 32, 3), "num_classes": 10}
RECORD_PREFIX = "RECORD "


def machine_info():
    """TensorFlow version, GPUs (names and compute capability from ``get_device_details``) and CPUs. Lists the
    devices without creating a TensorFlow context (no GPU memory is taken in the parent process)."""
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append({"device": device.name, "name": details.get("device_name"),
                     "compute_capability": ".".join(map(str, capability)) if capability else None})
    info = {"platform": platform.platform(), "python": platform.python_version(), "tensorflow": tf.__version__,
            "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "gpus": gpus}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def synthetic_dataset():
    """Random uint8 pixels scaled to [-1, 1] as the library scales real ones, 32x32x3, 10 classes."""
    from jem_tf.data import ImageDataset, scale_uint8

    rng = np.random.default_rng(0)
    shape, classes = SYNTHETIC["shape"], SYNTHETIC["num_classes"]

    def split(n):
        return (scale_uint8(rng.integers(0, 256, (n, *shape), dtype=np.uint8)),
                rng.integers(0, classes, n).astype(np.int32))

    (x_train, y_train), (x_test, y_test) = split(SYNTHETIC["num_train"]), split(SYNTHETIC["num_test"])
    return ImageDataset("synthetic", x_train, y_train, x_test, y_test, num_classes=classes)


def make_step_timer():
    """A Keras callback with the wall time of every training step (defined here, inside a function, so that
    `--help` and the parent process need no Keras)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self._start = [], None

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(np.ravel(logs["loss"])[0])  # waits for the step's result
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def summary(times, global_batch):
    times = np.asarray(times, dtype=float)
    median = float(np.median(times))
    return {"step_s_median": median, "step_s_p90": float(np.percentile(times, 90)),
            "step_s_mean": float(np.mean(times)), "images_per_s": global_batch / median, "timed_steps": len(times)}


def gpu_peak_memory_mb(reset=False):
    """Peak bytes allocated on each visible GPU (MiB) since the last reset; ``{}`` without GPUs."""
    import tensorflow as tf

    peaks = {}
    for index, _ in enumerate(tf.config.list_logical_devices("GPU")):
        name = f"GPU:{index}"
        peaks[name] = tf.config.experimental.get_memory_info(name)["peak"] / 2**20
        if reset:
            tf.config.experimental.reset_memory_stats(name)
    return peaks


def strategy_devices(strategy):
    """The devices a strategy's replicas run on (the default strategy has no list: TensorFlow's first GPU, else the
    CPU)."""
    import tensorflow as tf

    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return ["/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0"]
    return list(strategy.extended.worker_devices)


def one(args):
    """Times one (strategy, precision) in this process and prints its record as one JSON line."""
    import keras
    import tensorflow as tf

    from jem_tf.run.config import load_recipe
    from jem_tf.run.splits import load_run_dataset, run_splits
    from jem_tf.sampling.distribution import make_strategy
    from jem_tf.training.factories import (
        build_datasets,
        build_jem,
        compile_jem,
        resolve_config_precision,
        steps_per_epoch,
    )

    strategy_name, precision = args.strategy_one, args.precision_one
    recipe = load_recipe(RECIPE)
    overrides = {"strategy": strategy_name, "precision": precision}  # how it runs, not what it trains
    if not args.synthetic:  # the data the recipe trains on (cifar10 by default) and where it is
        overrides.update(dataset=args.dataset, data_dir=args.data_dir)
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.backbone is not None:
        overrides["backbone"] = args.backbone
    config = recipe.replace(**overrides).validate()

    # As train_and_evaluate: the strategy first (before TensorFlow initialises), then the data and its splits.
    strategy = make_strategy(config.strategy)
    replicas = int(strategy.num_replicas_in_sync)
    keras.utils.set_random_seed(config.seed)
    data = synthetic_dataset() if args.synthetic else load_run_dataset(config=config)
    splits = run_splits(config, data)
    num_train = len(splits.train.images)
    total = args.warmup + args.steps
    # The precision probe times a single-device copy at the per-replica batch, outside the strategy's scope.
    config, precision_report = resolve_config_precision(
        config, image_shape=data.image_shape, num_classes=data.num_classes,
        batch_size=max(1, config.batch_size // replicas), log=lambda line: print(line, flush=True))

    def train(run_config):
        """``(seconds of every step, steps per epoch)`` of ``total`` steps of ``run_config``."""
        epoch_steps = steps_per_epoch(run_config, num_train)
        with strategy.scope():
            model = build_jem(run_config, image_shape=data.image_shape, num_classes=data.num_classes,
                              train_data=splits.labelled, steps_per_epoch=epoch_steps)
            compile_jem(model, run_config, steps_per_epoch=epoch_steps)
        # Enough of the recipe's seeded epochs for `total` steps (the validation pipeline is not used).
        train_ds, _, _ = build_datasets(run_config, splits, num_epochs=math.ceil(total / epoch_steps))
        timer = make_step_timer()
        model.fit(train_ds, epochs=1, steps_per_epoch=total, callbacks=[timer], verbose=0, shuffle=False)
        return timer.times, epoch_steps

    def measure(name, run_config):
        gc.collect()  # the previous model's tensors, before the peak memory is reset
        gpu_peak_memory_mb(reset=True)
        start = time.perf_counter()
        times, epoch_steps = train(run_config)
        wall = time.perf_counter() - start
        # An epoch's last batch is smaller when the batch does not divide the training split: not timed.
        partial = set() if num_train % run_config.batch_size == 0 else {
            step for step in range(total) if (step + 1) % epoch_steps == 0}
        timed = [t for step, t in enumerate(times) if step >= args.warmup and step not in partial]
        if not timed:
            raise SystemExit(f"{name}: no step left to time (--steps {args.steps}, --warmup {args.warmup})")
        result = summary(timed, run_config.batch_size)
        result.update(first_step_s=times[0], wall_s_including_build=wall, step_s_all=times,
                      partial_batch_steps_skipped=sorted(s for s in partial if s >= args.warmup),
                      gpu_peak_memory_mb=gpu_peak_memory_mb())
        print(f"{name}: median {result['step_s_median']:.4f} s/step, p90 {result['step_s_p90']:.4f} s, "
              f"{result['images_per_s']:.1f} images/s (first step {times[0]:.1f} s)", flush=True)
        return result, epoch_steps

    jem, epoch_steps = measure("JEM", config)
    classifier, _ = measure("classifier", config.replace(**CLASSIFIER).validate())
    record = {
        "recipe": RECIPE, "recipe_unchanged": args.backbone is None and args.batch_size in (None, recipe.batch_size),
        "strategy": strategy_name, "replicas": replicas, "devices": strategy_devices(strategy),
        "precision_requested": precision, "precision": config.precision, "precision_report": precision_report,
        "backbone": config.backbone, "global_batch": config.batch_size,
        "per_replica_batch": config.batch_size / replicas, "sgld_steps": config.sgld_steps,
        "dataset": "synthetic" if args.synthetic else config.dataset, "num_train": num_train,
        "steps_per_epoch": epoch_steps, "warmup": args.warmup, "steps": args.steps,
        "steps_per_execution": config.steps_per_execution, "jit_compile": config.jit_compile,
        "gpus_visible": len(tf.config.list_physical_devices("GPU")),
        "jem": jem, "classifier": classifier, "jem_over_classifier": jem["step_s_median"] / classifier["step_s_median"],
    }
    print(RECORD_PREFIX + json.dumps(record), flush=True)
    return 0


def _one_args(strategy, precision, args):
    command = ["--one", "--strategy-one", strategy, "--precision-one", precision, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--dataset", args.dataset]
    command += ["--data-dir", args.data_dir] if args.data_dir else []
    command += ["--batch-size", str(args.batch_size)] if args.batch_size is not None else []
    command += ["--backbone", args.backbone] if args.backbone else []
    return command + ["--synthetic"] * args.synthetic


def _run_one(one_args, what):
    """Runs this script with ``one_args`` in a fresh process, echoing its progress; returns its record, or
    ``{"error": ...}`` when it failed (the other combinations still run)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    record = None
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([sys.executable, os.path.abspath(__file__), *one_args], stdout=subprocess.PIPE,
                                   stderr=stderr, text=True, env=env)
        for line in process.stdout:
            if line.startswith(RECORD_PREFIX):
                record = json.loads(line[len(RECORD_PREFIX):])
            else:
                print(f"  [{what}] {line.rstrip()}", flush=True)
        returncode = process.wait()
        if returncode == 0 and record is not None:
            return record
        stderr.seek(0)
        tail = stderr.read()[-3000:]
    sys.stderr.write(tail)
    print(f"  [{what}] FAILED with exit code {returncode}", flush=True)
    return {"error": f"exit code {returncode}", "stderr_tail": tail}


def print_table(records):
    header = ("strategy", "replicas", "precision", "batch", "JEM s/step", "JEM p90", "JEM img/s", "clf s/step",
              "clf p90", "clf img/s", "JEM/clf")
    rows = []
    for r in records:
        if "error" in r:
            rows.append((r["strategy"], "-", r["precision_requested"], "-", "FAILED") + ("-",) * 6)
            continue
        jem, clf = r["jem"], r["classifier"]
        precision = r["precision"] + (" (auto)" if r["precision_requested"] == "auto" else "")
        rows.append((r["strategy"], r["replicas"], precision, r["global_batch"],
                     f"{jem['step_s_median']:.4f}", f"{jem['step_s_p90']:.4f}", f"{jem['images_per_s']:.1f}",
                     f"{clf['step_s_median']:.4f}", f"{clf['step_s_p90']:.4f}", f"{clf['images_per_s']:.1f}",
                     f"{r['jem_over_classifier']:.1f}x"))
    widths = [max(len(str(row[i])) for row in rows + [header]) + 2 for i in range(len(header))]
    for row in [header] + rows:
        print("".join(str(cell).rjust(width) for cell, width in zip(row, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10",
                        help="a tfds name (read from --data-dir) or an image folder (train/<class>/, test/<class>/)")
    parser.add_argument("--data-dir", default=None, help="the tfds data directory (default: tfds's)")
    parser.add_argument("--synthetic", action="store_true",
                        help="random 32x32x3 images of 10 classes (5,000 training images) instead of --dataset")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["float32", "auto"],
                        help="auto: the library's measured probe picks float32 or mixed_bfloat16")
    parser.add_argument("--steps", type=int, default=50, help="timed training steps of each model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (tracing, allocation)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the recipe's, 64)")
    parser.add_argument("--backbone", default=None,
                        help="smoke tests on a CPU only: another backbone (e.g. wrn-10-1); not the recipe's figures")
    parser.add_argument("--out", help="write the records and the machine (JSON) here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy-one", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--precision-one", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.data_dir:
        args.data_dir = os.path.expanduser(args.data_dir)
    if args.one:
        return one(args)

    machine = machine_info()
    gpus = machine["gpus"]
    notes = []
    if not gpus:
        notes.append("No GPU is visible to TensorFlow: these are CPU figures, not GPU figures.")
    if args.backbone is not None:
        notes.append(f"--backbone {args.backbone} overrides the recipe's backbone: these figures are NOT the "
                     f"{RECIPE} recipe's (a smoke test).")
    if args.batch_size is not None:
        notes.append(f"--batch-size {args.batch_size} overrides the recipe's global batch.")
    if args.synthetic:
        notes.append("--synthetic: random images (the step time does not depend on the pixels).")
    strategies = list(args.strategies)
    if "mirrored" in strategies and len(gpus) < 2:
        strategies.remove("mirrored")
        notes.append(f"mirrored skipped: {'one GPU' if gpus else 'no GPU and one CPU device'} (over one device it "
                     "is the default strategy's computation).")
    for note in notes:
        print(f"NOTE: {note}", flush=True)

    records = []
    for strategy in strategies:
        for precision in args.precisions:
            what = f"{strategy}/{precision}"
            print(f"== {what}", flush=True)
            record = _run_one(_one_args(strategy, precision, args), what)
            record.setdefault("strategy", strategy)
            record.setdefault("precision_requested", precision)
            records.append(record)

    gpu_names = ", ".join(f"{g['name']} (cc {g['compute_capability']})" for g in gpus) or "none (CPU figures)"
    print(f"\n{RECIPE}: TensorFlow {machine['tensorflow']}, GPUs: {gpu_names}, {machine['usable_cpus']} usable CPUs; "
          f"{'synthetic data' if args.synthetic else args.dataset}; median and p90 of {args.steps} steps after "
          f"{args.warmup} warm-up, steps_per_execution 1; clf: the same recipe with px, pxy and energy-l2 weights 0")
    print_table(records)
    for note in notes:
        print(f"NOTE: {note}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"recipe": RECIPE, "machine": machine, "notes": notes, "records": records}, f, indent=2)
        print(f"wrote {args.out}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
