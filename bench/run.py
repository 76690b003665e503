"""JEM training-step benchmark: seconds per JEM and plain-classifier iteration, SGLD throughput,
achieved GFLOP/s against this machine's measured peak, peak memory and exported classify latency.

    python bench/run.py                                         # small-cnn, wrn-10-1, wrn-28-2 in float32
    python bench/run.py --models wrn-10-1 wrn-28-2 --precision float32 mixed_bfloat16 --out bench.json

Every (model, precision) runs in its own Python process; its peak RSS is read right after the JEM steps
(before the classifier and the export are built), so it is that of JEM training alone. Each process builds
a JEM exactly as training does (reference semantics: batch 64, 20 SGLD steps of step 1.0 and noise 0.01, a
10,000-image replay buffer with 5 % restarts, data noise 0.03, Adam) on random data of the model's input
shape, runs `model.fit` and times the steps after --warmup warm-up steps (tracing excluded); the median
of --repeats steps is reported. The plain classifier is the same network and fit loop with the p(x) term
off (no SGLD). FLOPs are counted analytically from the conv and dense layers: a forward pass is F per
image, an SGLD step (forward plus gradient with respect to the input only) 2F, a training pass on the
data and sample batches 3F per image.

Writes a JSON list of records (--out) with model, precision, batch_size, n_steps, jem_step_s_median,
clf_step_s_median, peak_rss_mb, the other figures, and machine info.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from export_latency import timings  # this folder (the script's own directory is on sys.path)

MODELS = {  # name -> (TrainConfig.backbone, input shape)
    "small-cnn": ("small_cnn", (8, 8, 1)),
    "wrn-10-1": ("wrn-10-1", (32, 32, 3)),
    "wrn-28-2": ("wrn-28-2", (32, 32, 3)),
    "wrn-28-10": ("wrn-28-10", (32, 32, 3)),
}
# Official PyTorch JEM on a 2-core CPU machine of the CI kind (batch 64, 20 SGLD steps), seconds/iteration.
REFERENCE_S = {"wrn-10-1": (1.47, 0.12, 780), "wrn-28-2": (9.24, 0.66, 1520), "wrn-28-10": (181.3, 12.8, 5670)}


def machine_info():
    import tensorflow as tf

    info = {"platform": platform.platform(), "python": platform.python_version(), "tensorflow": tf.__version__,
            "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                                 if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
        info["cpu_features"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if info["gpus"]:
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        info["gpu_name"] = details.get("device_name")
    return info


def _median_time(fn, repeats):
    return timings(fn, repeats)[0]  # two untimed warm-up calls, then the median of `repeats`


def measure_peak(dtype_name, repeats=5):
    """Measured matmul (4096^2) and conv (batch 64, 32x32, 160->160 channels, 3x3) GFLOP/s."""
    import tensorflow as tf

    dtype = getattr(tf, dtype_name)
    device = "/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"
    with tf.device(device):
        a = tf.cast(tf.random.normal([4096, 4096]), dtype)
        matmul = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, a)[:1, :1], tf.float32)))
        x = tf.cast(tf.random.normal([64, 32, 32, 160]), dtype)
        k = tf.cast(tf.random.normal([3, 3, 160, 160]), dtype)
        conv = tf.function(lambda: tf.reduce_sum(tf.cast(tf.nn.conv2d(x, k, 1, "SAME")[:1, :1, :1, :1], tf.float32)))
        t_mm = _median_time(lambda: matmul().numpy(), repeats)
        t_conv = _median_time(lambda: conv().numpy(), repeats)
    return {"dtype": dtype_name, "matmul_gflops": 2 * 4096**3 / t_mm / 1e9,
            "conv_gflops": 2 * 64 * 32 * 32 * 160 * 160 * 9 / t_conv / 1e9}


def forward_flops(network):
    """Multiply-adds x 2 of the Conv2D and Dense layers for one image."""
    import keras

    flops = 0
    for layer in network.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w = layer.kernel_size
            flops += 2 * h * w * c_out * k_h * k_w * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            flops += 2 * layer.units * layer.input.shape[-1]
    return flops


def worker(args):
    """Measures one (model, precision) in this process and prints its record as JSON."""
    import keras
    import tensorflow as tf

    from jem_tf.run.config import TrainConfig
    from jem_tf.serving import export_saved_model
    from jem_tf.training.factories import build_jem, compile_jem

    backbone_name, shape = MODELS[args.model]
    batch, spe = args.batch_size, args.steps_per_execution
    rng = np.random.default_rng(0)
    steps = (args.warmup + args.repeats) * spe
    x = rng.uniform(-1, 1, (batch * steps, *shape)).astype("float32")
    y = rng.integers(0, 10, batch * steps).astype("int32")

    def build(px_weight):
        """The JEM training builds from a config: the reference's settings and this run's options."""
        config = TrainConfig().replace(
            backbone=backbone_name, precision=args.precision, batch_size=batch, learning_rate=1e-4, warmup_steps=0,
            sgld_steps=args.sgld_steps, sgld_step_size=1.0, sgld_noise_std=0.01,
            sgld_jit_compile=args.sgld_jit_compile, jit_compile=args.jit_compile, buffer_size=10_000,
            buffer_storage=args.buffer_storage,
            restart_prob=0.05, px_weight=px_weight, data_noise_std=0.03, steps_per_execution=spe, seed=0).validate()
        return compile_jem(build_jem(config, image_shape=shape, num_classes=10), config, steps_per_epoch=steps)

    class StepTimer(keras.callbacks.Callback):
        """Wall time of every execution of the train function (synchronised by reading the loss)."""

        def __init__(self):
            super().__init__()
            self.times, self._start = [], None

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])
            self.times.append(time.perf_counter() - self._start)

    def step_times(model):
        timer = StepTimer()
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
        times = np.asarray(timer.times[args.warmup:]) / spe
        return float(np.median(times)), times.tolist(), model.train_step_trace_count

    jem = build(1.0)
    jem_median, jem_times, jem_traces = step_times(jem)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # JEM training only, so far
    clf = build(0.0)
    clf_median, clf_times, _ = step_times(clf)

    # The sampler alone (JEM.refine: the training step's SGLD loop, compiled once): images x steps per second.
    chains = rng.uniform(-1, 1, (batch, *shape)).astype("float32")
    sampler_s = _median_time(lambda: jem.refine(chains, n_steps=args.sgld_steps, settings="sampler"), args.repeats)

    flops = forward_flops(jem.backbone)
    jem_flops = batch * (args.sgld_steps * 2 * flops + 2 * 3 * flops)
    record = {
        "model": args.model, "precision": args.precision, "batch_size": batch, "n_steps": args.sgld_steps,
        "steps_per_execution": spe, "sgld_jit_compile": args.sgld_jit_compile, "jit_compile": args.jit_compile,
        "buffer_storage": args.buffer_storage,
        "input_shape": list(shape), "params": int(jem.backbone.count_params()),
        "jem_step_s_median": jem_median, "clf_step_s_median": clf_median,
        "jem_step_s_all": jem_times, "clf_step_s_all": clf_times,
        "train_function_traces": jem_traces,
        "sampler_s_median": sampler_s,
        "sampler_images_steps_per_s": batch * args.sgld_steps / sampler_s,
        "forward_gflop_per_image": flops / 1e9,
        "sampler_gflops": batch * args.sgld_steps * 2 * flops / sampler_s / 1e9,
        "jem_step_gflops": jem_flops / jem_median / 1e9,
    }
    if not args.skip_export:
        with tempfile.TemporaryDirectory() as base:
            loaded = tf.saved_model.load(export_saved_model(jem, base, ood_threshold=0.0))
            classify = loaded.signatures["classify"]
            for n in (1, batch):
                images = tf.constant(rng.uniform(-1, 1, (n, *shape)).astype("float32"))
                record[f"classify_ms_batch_{n}"] = 1e3 * _median_time(lambda: classify(images=images), 20)
    record["peak_rss_mb"] = peak_rss_mb
    record["peak_rss_mb_with_export"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RECORD " + json.dumps(record))


def _worker_args(model, precision, args):
    command = ["--worker", "--model", model, "--precision-one", precision, "--batch-size", str(args.batch_size),
               "--sgld-steps", str(args.sgld_steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--steps-per-execution", str(args.steps_per_execution), "--buffer-storage", args.buffer_storage]
    return (command + ["--sgld-jit-compile"] * args.sgld_jit_compile + ["--jit-compile"] * args.jit_compile
            + ["--skip-export"] * args.skip_export)


def _run_worker(worker_args, what):
    """Runs this script with ``worker_args`` in a fresh process and returns the JSON it prints."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *worker_args], capture_output=True,
                            text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RECORD ")]
    if result.returncode != 0 or not lines:
        sys.stderr.write(result.stderr[-3000:])
        raise SystemExit(f"benchmark of {what} failed with exit code {result.returncode}")
    return json.loads(lines[-1][len("RECORD "):])


def print_table(records, peaks):
    header = ("model", "precision", "JEM s/it", "clf s/it", "ref JEM", "speed-up", "SGLD img*st/s",
              "SGLD GFLOP/s", "% peak", "RSS MB", "ref RSS", "cls ms b1/bN")
    rows = []
    for r in records:
        ref = REFERENCE_S.get(r["model"])
        peak = peaks.get(r["precision"].split("_")[-1], {}).get("conv_gflops")
        classify = [r.get(f"classify_ms_batch_{n}") for n in (1, r["batch_size"])]
        rows.append((
            r["model"], r["precision"], f"{r['jem_step_s_median']:.3f}", f"{r['clf_step_s_median']:.3f}",
            f"{ref[0]:.2f}" if ref else "-", f"{ref[0] / r['jem_step_s_median']:.2f}x" if ref else "-",
            f"{r['sampler_images_steps_per_s']:.0f}", f"{r['sampler_gflops']:.1f}",
            f"{100 * r['sampler_gflops'] / peak:.0f}" if peak else "-", f"{r['peak_rss_mb']:.0f}",
            f"{ref[2]}" if ref else "-",
            "/".join(f"{c:.1f}" for c in classify) if None not in classify else "-"))
    widths = [max(len(str(row[i])) for row in rows + [header]) + 2 for i in range(len(header))]
    for row in [header] + rows:
        print("".join(str(cell).rjust(width) for cell, width in zip(row, widths)))
    for name, p in peaks.items():
        print(f"measured peak {name}: matmul 4096^2 {p['matmul_gflops']:.0f} GFLOP/s, "
              f"conv 3x3 160->160 channels {p['conv_gflops']:.0f} GFLOP/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["small-cnn", "wrn-10-1", "wrn-28-2"])
    parser.add_argument("--precision", nargs="+", default=["float32"],
                        choices=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sgld-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (tracing, allocation)")
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--sgld-jit-compile", action="store_true", help="compile the SGLD loop with XLA")
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile the whole train step with XLA (JEM.compile(jit_compile=True)); default off")
    parser.add_argument("--buffer-storage", choices=["float32", "uint8"], default="float32")
    parser.add_argument("--skip-export", action="store_true", help="do not time the exported classify signature")
    parser.add_argument("--out", help="write the records (JSON list) here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--precision-one", help=argparse.SUPPRESS)
    parser.add_argument("--measure-peaks", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "sgld_steps", "repeats", "steps_per_execution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.worker:
        args.precision = args.precision_one
        return worker(args)

    if args.measure_peaks:
        print("RECORD " + json.dumps({d: measure_peak(d) for d in args.measure_peaks}))
        return 0

    peaks = _run_worker(["--measure-peaks", "float32",
                         *sorted({p.split("_")[1] for p in args.precision if p != "float32"})], "peak GFLOP/s")
    machine = machine_info()
    records = []
    for model in args.models:
        for precision in args.precision:
            record = _run_worker(_worker_args(model, precision, args), f"{model} ({precision})")
            record["machine"] = machine
            record["peak_gflops"] = peaks
            records.append(record)
            print(f"done: {model} {precision}: JEM {record['jem_step_s_median']:.3f} s/it, "
                  f"classifier {record['clf_step_s_median']:.3f} s/it", flush=True)
    print(f"\nmachine: {machine.get('cpu_model', platform.processor())}, {machine['usable_cpus']} usable CPUs, "
          f"GPUs: {machine['gpus'] or 'none'}, TensorFlow {machine['tensorflow']}; batch {args.batch_size}, "
          f"{args.sgld_steps} SGLD steps, median of {args.repeats} steps after {args.warmup} warm-up")
    print_table(records, peaks)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
