"""``precision="auto"``: pick the compute precision from what this machine really does, by measuring it once.

Mixed bfloat16 is not uniformly faster on CPUs: depending on the processor (AMX, AVX512_BF16 without AMX,
other vendors) it has measured clearly faster or clearly slower than float32 for the same JEM step (figures in
docs/performance.md). No CPU flag predicts this reliably, so :func:`resolve_precision` times the actual
network: JEM-shaped steps (an SGLD input gradient and a weight gradient of cross-entropy plus energy, on a batch
of the training shape) in each candidate precision, and keeps bfloat16 only if it is clearly faster than float32
(by ``min_speedup``, 1.5x), so ``auto`` is never slower than float32 beyond the probe's noise. A CPU without
bfloat16 instructions (no ``avx512_bf16`` or ``amx_bf16`` flag) and no GPU gets float32 without a probe: there
bfloat16 is emulated.

The decision must not depend on what else the machine is doing, or the same command would train (and export)
in a different precision from one run to the next. So:

* the candidates are timed **interleaved** (one step of each in turn, several rounds), so a background job
  slows them alike, and each candidate's time is its **fastest** step: other work only ever adds time, so the
  minimum is the estimate least moved by it;
* the margin is wide: on this project's 2-core test machine (AMX) the digits network measured about 1.0x idle
  and 1.02x to 1.29x beside a busy training run (fewer free cores favour the AMX units), the Fashion-MNIST and
  CIFAR-10 networks 1.8x to 2.1x; a 1.5x margin splits them the same way under either load
  (``bench/precision_probe.py``);
* the decision is **cached per machine kind** (the processor's name and its bfloat16/AMX flags, the GPUs,
  the TensorFlow version) and workload (the network's architecture, batch size, candidates, ``min_speedup``):
  ``$XDG_CACHE_HOME/jem_tf/precision/<key>.json`` (else ``~/.cache/...``). A later run of the same command on
  this machine reads it instead of probing again: the same precision every time. Delete the file (or pass
  ``cache_dir=None``) to measure again.

The choice, the timings and where they came from are returned for the run's log and ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from jem_tf import seeds
from jem_tf.files import DiskFullError, atomic_write_json
from jem_tf.model import energy as energy_lib
from jem_tf.networks import with_precision

AUTO_CANDIDATES = ("float32", "mixed_bfloat16")
# The CPU flags that bear on 16-bit speed (part of the machine kind).
_CPU_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def _jem_step(backbone: keras.Model, *, batch_size: int, seed: int):
    """A traced JEM-shaped step of ``backbone`` on random inputs (see :func:`time_jem_steps`)."""
    shape = (batch_size,) + tuple(backbone.input_shape[1:])
    num_classes = backbone.output_shape[-1]
    x = tf.random.stateless_uniform(shape, seed=[seed, seeds.PROBE_IMAGES], minval=-1.0, maxval=1.0)
    y = tf.random.stateless_uniform([batch_size], seed=[seed, seeds.PROBE_LABELS], maxval=num_classes, dtype=tf.int32)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total_energy = tf.reduce_sum(energy_lib.energy(tf.cast(backbone(x, training=False), tf.float32)))
        x_sample = x - tf.clip_by_value(tape.gradient(total_energy, x), -1.0, 1.0)
        with tf.GradientTape() as tape:
            logits = tf.cast(backbone(tf.concat([x, x_sample], 0), training=True), tf.float32)
            data, sample = tf.split(logits, 2)
            loss = (tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, data, from_logits=True))
                    + tf.reduce_mean(energy_lib.energy(data)) - tf.reduce_mean(energy_lib.energy(sample)))
        gradients = tape.gradient(loss, backbone.trainable_variables)
        return tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in gradients if g is not None])

    return lambda: step(x, y).numpy()


def time_jem_steps(backbones: Dict[str, keras.Model], *, batch_size: int, rounds: int = 5, warmup: int = 2,
                   seed: int = 0) -> Dict[str, float]:
    """``{name: seconds}``: the fastest of ``rounds`` JEM-shaped steps of each backbone, timed interleaved (one
    step of each in turn per round, after ``warmup`` untimed calls each). A step is the input gradient of the
    energy (what an SGLD step computes) and the weight gradient of cross-entropy plus the energies of data and
    samples (what a training step computes), on random inputs."""
    steps = {name: _jem_step(backbone, batch_size=batch_size, seed=seed) for name, backbone in backbones.items()}
    for step in steps.values():
        for _ in range(warmup):
            step()
    fastest = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            fastest[name] = min(fastest[name], time.perf_counter() - start)
    return fastest


def time_jem_step(backbone: keras.Model, *, batch_size: int, repeats: int = 5, warmup: int = 2,
                  seed: int = 0) -> float:
    """Seconds of one JEM-shaped step of ``backbone``: the fastest of ``repeats`` (see :func:`time_jem_steps`)."""
    return time_jem_steps({"model": backbone}, batch_size=batch_size, rounds=repeats, warmup=warmup, seed=seed)["model"]


def machine_kind() -> dict:
    """What the precision decision depends on besides the network: the processor, its 16-bit flags, the GPUs and
    the TensorFlow version."""
    names, flags = [], set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    names.append(value.strip())
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the platform's own name
        pass
    cpu = names[0] if names else (platform.processor() or platform.machine())
    gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")]
    return {"cpu": cpu, "cpu_flags": [flag for flag in _CPU_FLAGS if flag in flags], "gpus": gpus,
            "tensorflow": tf.__version__}


def has_bfloat16_hardware(machine: dict) -> bool:
    """Whether ``machine`` (:func:`machine_kind`) computes bfloat16 natively: a GPU, or a CPU with AVX512_BF16 or
    AMX-BF16 instructions (elsewhere oneDNN emulates it, slower than float32)."""
    return bool(machine["gpus"]) or any(flag in machine["cpu_flags"] for flag in ("avx512_bf16", "amx_bf16"))


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/jem_tf/precision``, else ``~/.cache/jem_tf/precision``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jem_tf", "precision")


def _cache_key(machine: dict, backbone: keras.Model, batch_size: int, candidates, min_speedup: float) -> str:
    workload = {"machine": machine, "architecture": json.loads(backbone.to_json()), "batch_size": batch_size,
                "candidates": list(candidates), "min_speedup": min_speedup}
    return hashlib.sha256(json.dumps(workload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read_cached(path: str, candidates) -> Optional[dict]:
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None  # none yet, or unreadable: measure (and rewrite it)
    if not isinstance(report, dict) or report.get("precision") not in candidates:
        return None
    return report


def resolve_precision(precision: str, *, backbone: keras.Model, batch_size: int,
                      candidates: Sequence[str] = AUTO_CANDIDATES, min_speedup: float = 1.5,
                      log: Optional[Callable[[str], None]] = print, cache_dir: Optional[str] = "default",
                      rounds: int = 7) -> Tuple[str, Dict]:
    """``(precision, report)``: ``precision`` itself unless it is ``"auto"``; for ``"auto"`` the fastest of
    ``candidates`` on this machine kind (see the module docstring): read from the cache in ``cache_dir``
    (``"default"``: :func:`default_cache_dir`; ``None``: no cache) or measured with :func:`time_jem_steps` on
    ``backbone`` (a float32 model; copies in each precision are timed, ``backbone`` is not changed) and cached.
    A 16-bit candidate must beat float32 by ``min_speedup`` (default 1.5x) to be chosen; without bfloat16
    hardware (:func:`has_bfloat16_hardware`) float32 is chosen unmeasured. ``report`` holds the
    choice, the reason, the seconds per probe step of each candidate, the machine kind and ``source``
    (``"measured"`` or the cache file); ``log`` gets one line saying what was chosen and why."""
    if precision != "auto":
        return precision, {"precision": precision, "reason": "set explicitly"}
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be an int >= 1; received {batch_size!r}")
    if "float32" not in candidates:
        raise ValueError(f"`candidates` must include float32 (the reference); received {candidates!r}")
    machine = machine_kind()
    if not has_bfloat16_hardware(machine):
        reason = "this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16) and there is no GPU"
        if log is not None:
            log(f"precision auto -> float32: {reason}")
        return "float32", {"precision": "float32", "reason": reason, "machine": machine, "source": "hardware"}
    if cache_dir == "default":
        cache_dir = default_cache_dir()
    path = None if cache_dir is None else os.path.join(
        cache_dir, _cache_key(machine, backbone, batch_size, candidates, min_speedup) + ".json")
    report = None if path is None else _read_cached(path, candidates)
    if report is not None:
        report["source"] = path
        if log is not None:
            log(f"precision auto -> {report['precision']}: {report['reason']} (decided on this machine kind at "
                f"{report.get('measured_at', '?')}; cached in {path})")
        return report["precision"], report
    # A fresh copy of the architecture is timed (its training-mode passes would update batch-norm statistics
    # of ``backbone`` itself, e.g. a converted classifier's).
    probe = keras.models.clone_model(backbone)
    seconds = time_jem_steps({name: with_precision(probe, name) for name in candidates}, batch_size=batch_size,
                             rounds=rounds)
    best = min(seconds, key=seconds.get)
    speedup = seconds["float32"] / seconds[best]
    if best != "float32" and speedup < min_speedup:
        best, speedup = "float32", 1.0
    reason = (f"{best} was {speedup:.2f}x faster than float32 in a measured probe" if best != "float32" else
              f"no 16-bit precision beat float32 by {min_speedup:.2f}x in a measured probe")
    timings = ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in seconds.items())
    report = {"precision": best, "reason": reason, "probe_seconds_per_step": seconds, "machine": machine,
              "batch_size": batch_size, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if path is not None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            atomic_write_json(path, report)
        except (OSError, DiskFullError) as error:  # a read-only home, a full disk: decide anyway, say so
            if log is not None:
                log(f"precision auto: could not cache the decision in {path} "
                    f"({getattr(error, 'strerror', None) or error})")
            path = None
    report["source"] = "measured"
    if log is not None:
        log(f"precision auto -> {best}: {reason} (fastest JEM-shaped step of batch {batch_size}, interleaved: "
            f"{timings}){'' if path is None else f'; cached in {path}'}")
    return best, report
