"""``precision="auto"``: pick the compute precision from what this machine really does, by measuring it.

Mixed bfloat16 is not uniformly faster on CPUs: depending on the processor (AMX, AVX512_BF16 without AMX,
other vendors) it has measured clearly faster or clearly slower than float32 for the same JEM step (figures in
docs/performance.md). No CPU flag predicts this reliably, so :func:`resolve_precision` times the actual
network: a few JEM-shaped steps (an SGLD input gradient and a weight gradient of cross-entropy plus energy,
on a batch of the training shape) in each candidate precision, and keeps bfloat16 only if it is clearly
faster than float32 (by ``min_speedup``), so ``auto`` is never slower than float32 beyond the probe's noise.
The choice and the timings are returned for the run's log and ``metrics.json``.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from jem_tf import energy as energy_lib
from jem_tf import seeds
from jem_tf.networks import with_precision

AUTO_CANDIDATES = ("float32", "mixed_bfloat16")


def time_jem_step(backbone: keras.Model, *, batch_size: int, repeats: int = 5, warmup: int = 2,
                  seed: int = 0) -> float:
    """Median seconds of one JEM-shaped step of ``backbone`` (traced once, ``warmup`` untimed calls): the
    input gradient of the energy (what an SGLD step computes) and the weight gradient of cross-entropy
    plus the energies of data and samples (what a training step computes), on random inputs."""
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

    for _ in range(warmup):
        step(x, y).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x, y).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def resolve_precision(precision: str, *, backbone: keras.Model, batch_size: int,
                      candidates: Sequence[str] = AUTO_CANDIDATES, min_speedup: float = 1.15,
                      log: Optional[Callable[[str], None]] = print) -> Tuple[str, Dict]:
    """``(precision, report)``: ``precision`` itself unless it is ``"auto"``; for ``"auto"`` the fastest of
    ``candidates`` on this machine, measured with :func:`time_jem_step` on ``backbone`` (a float32 model;
    copies in each precision are timed, ``backbone`` is not changed). A 16-bit candidate must beat float32
    by ``min_speedup`` (default 1.15x) to be chosen. ``report`` holds the choice, the reason and the
    seconds per probe step of each candidate; ``log`` gets one line saying what was chosen and why."""
    if precision != "auto":
        return precision, {"precision": precision, "reason": "set explicitly"}
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be an int >= 1; received {batch_size!r}")
    if "float32" not in candidates:
        raise ValueError(f"`candidates` must include float32 (the reference); received {candidates!r}")
    # A fresh copy of the architecture is timed (its training-mode passes would update batch-norm statistics
    # of ``backbone`` itself, e.g. a converted classifier's).
    probe = keras.models.clone_model(backbone)
    seconds = {name: time_jem_step(with_precision(probe, name), batch_size=batch_size) for name in candidates}
    best = min(seconds, key=seconds.get)
    speedup = seconds["float32"] / seconds[best]
    if best != "float32" and speedup < min_speedup:
        best, speedup = "float32", 1.0
    reason = (f"{best} was {speedup:.2f}x faster than float32 in a measured probe" if best != "float32" else
              f"no 16-bit precision beat float32 by {min_speedup:.2f}x in a measured probe")
    timings = ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in seconds.items())
    if log is not None:
        log(f"precision auto -> {best}: {reason} (JEM-shaped step of batch {batch_size}: {timings})")
    return best, {"precision": best, "reason": reason, "probe_seconds_per_step": seconds}
