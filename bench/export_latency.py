"""Export size and per-signature latency of a jem-tf SavedModel (plain Python, CPU or GPU).

    python bench/export_latency.py                          # a fresh digits-shaped small CNN
    python bench/export_latency.py --model runs/digits      # a trained work directory or .keras file
    python bench/export_latency.py --out latency.json

Loads the export with tf.saved_model.load (as a Python serving process would), warms every signature up,
then reports the median and 90th-percentile wall time of --repeats calls per signature and batch size.
`sample` is timed with num_samples = batch size and --n-steps SGLD steps.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def timings(fn, repeats):
    fn()  # warm-up (first call traces/optimises)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.percentile(times, 90))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="training work directory or .keras file (default: fresh small CNN)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--n-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", help="write the records as JSON here")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    import jem_tf
    from jem_tf.serving import export_saved_model

    if args.model:
        path = os.path.join(args.model, "model.keras") if os.path.isdir(args.model) else args.model
        model = keras.models.load_model(path)
    else:
        model = jem_tf.JEM(jem_tf.small_cnn(num_classes=10, input_shape=(8, 8, 1), seed=0), buffer_size=100)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as base:
        calibration = rng.uniform(-1, 1, (64, *model.image_shape)).astype("float32")
        export_path = export_saved_model(model, base, calibration_images=calibration)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(export_path) for f in fs)
        loaded = tf.saved_model.load(export_path)
        records = []
        for batch in args.batch_sizes:
            images = tf.constant(rng.uniform(-1, 1, (batch, *model.image_shape)).astype("float32"))
            calls = {
                "classify": lambda: loaded.signatures["classify"](images=images),
                "energy": lambda: loaded.signatures["energy"](images=images),
                f"sample ({args.n_steps} steps)": lambda: loaded.signatures["sample"](
                    num_samples=tf.constant(batch), n_steps=tf.constant(args.n_steps), seed=tf.constant(0, tf.int64),
                    class_label=tf.constant(-1), step_size=tf.constant(0.0), noise_std=tf.constant(-1.0)),
            }
            for name, fn in calls.items():
                median, p90 = timings(fn, args.repeats)
                records.append({"signature": name, "batch_size": batch, "median_ms": 1e3 * median, "p90_ms": 1e3 * p90})
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "tensorflow": tf.__version__, "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}
    print(f"export size: {size / 1024:.0f} KiB; backbone {model.backbone.name}, input {model.image_shape}")
    print(f"{'signature':<22}{'batch':>6}{'median ms':>12}{'p90 ms':>10}")
    for r in records:
        print(f"{r['signature']:<22}{r['batch_size']:>6}{r['median_ms']:>12.2f}{r['p90_ms']:>10.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"export_size_bytes": size, "machine": machine, "records": records}, f, indent=2)


if __name__ == "__main__":
    main()
