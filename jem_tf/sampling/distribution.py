"""Distribution helpers: where a replica's examples sit in the global batch, and strategies.

JEM draws its random numbers (data noise, replay-buffer slots and restarts, SGLD noise) for the
*global* batch from a seed shared by all replicas; each replica keeps its own rows. Replicas therefore
draw different numbers, and a step under ``MirroredStrategy`` or ``MultiWorkerMirroredStrategy`` uses
exactly the randomness of a single-device step on the same global batch and seed.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional, Sequence, Tuple

import tensorflow as tf

from jem_tf.choices import STRATEGIES

BatchPosition = Tuple[tf.Tensor, tf.Tensor]


def global_batch_position(local_batch_size) -> BatchPosition:
    """``(offset, global_batch_size)`` of this replica's rows in the global batch.

    In a replica context with several replicas the local batch sizes are all-gathered (replica order
    is batch order, as ``tf.distribute`` splits a global batch); otherwise ``(0, local_batch_size)``.
    """
    local_batch_size = tf.cast(local_batch_size, tf.int32)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tf.constant(0, tf.int32), local_batch_size
    sizes = context.all_gather(tf.reshape(local_batch_size, [1]), axis=0)
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    before = tf.range(tf.shape(sizes)[0]) < replica
    offset = tf.reduce_sum(tf.where(before, sizes, tf.zeros_like(sizes)))
    return offset, tf.reduce_sum(sizes)


def replica_random(random_fn, local_shape, position: Optional[BatchPosition], **kwargs) -> tf.Tensor:
    """``random_fn(shape, **kwargs)`` (a stateless TF random op) drawn for the global batch, of which this
    replica keeps its rows ``[offset, offset + local_shape[0])``; with ``position=None`` simply
    ``random_fn(local_shape, **kwargs)``."""
    if position is None:
        return random_fn(local_shape, **kwargs)
    local_shape = tf.cast(local_shape, tf.int32)
    global_shape = tf.concat([tf.reshape(position[1], [1]), local_shape[1:]], axis=0)
    return random_fn(global_shape, **kwargs)[position[0]:position[0] + local_shape[0]]


def all_gather_rows(*tensors):
    """All-gathers tensors along the batch axis from every replica (identity with one replica)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensors if len(tensors) > 1 else tensors[0]
    gathered = tuple(context.all_gather(t, axis=0) for t in tensors)
    return gathered if len(gathered) > 1 else gathered[0]


def split_cpu(num_devices: int) -> None:
    """Splits the physical CPU into ``num_devices`` logical devices, so that ``MirroredStrategy``
    can be tried without GPUs. Must run before TensorFlow initialises its devices."""
    if not (isinstance(num_devices, int) and num_devices >= 1):
        raise ValueError(f"`num_devices` must be an int >= 1; received {num_devices!r}")
    cpus = tf.config.list_physical_devices("CPU")
    existing = tf.config.get_logical_device_configuration(cpus[0])
    if existing is not None and len(existing) == num_devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)])
    except RuntimeError as error:
        raise ValueError(
            f"Cannot split the CPU into {num_devices} devices: TensorFlow is already initialised "
            f"with {len(tf.config.list_logical_devices('CPU'))} ({error})."
        ) from error


def make_strategy(name: str = "default", *, devices: Optional[Sequence[str]] = None,
                  cpu_devices: int = 0) -> tf.distribute.Strategy:
    """Creates a ``tf.distribute`` strategy by name.

    Args:
        name: ``"default"`` (one device), ``"mirrored"`` (all local GPUs, or ``devices``; without GPUs
            the logical CPUs), ``"multi_worker"`` (``MultiWorkerMirroredStrategy``; reads ``TF_CONFIG``)
            or ``"tpu"`` (``TPUStrategy``; same code path, untested here: no TPU in CI).
        devices: Device names for ``mirrored``, e.g. ``["/gpu:0", "/gpu:1"]``.
        cpu_devices: If > 0, first split the CPU into this many logical devices (see :func:`split_cpu`).

    ``mirrored`` and ``multi_worker`` return the same instance for the same devices within a process
    (see ``_mirrored_strategy`` for why).
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; expected one of {STRATEGIES}.")
    if cpu_devices:
        split_cpu(cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if not devices and not tf.config.list_physical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return _mirrored_strategy(tuple(devices) if devices else None)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multi_worker' needs the TF_CONFIG environment variable "
                             "(see docs/distributed.md).")
        tf_config()  # a malformed TF_CONFIG named as such, not as TensorFlow's JSON error
        return _multi_worker_strategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


# One strategy instance per device set and process. TensorFlow's collective executor is
# process-wide and two MirroredStrategy instances over the same devices hand out the same collective
# instance keys: once a second instance runs a program whose collectives differ from the first's, the
# step fails with "Collective instance N expected type ... but got type ..." and every later
# collective in the process is aborted (measured with TF 2.21). MultiWorkerMirroredStrategy may only
# be created once per process anyway.
@functools.lru_cache(maxsize=None)
def _mirrored_strategy(devices: Optional[Tuple[str, ...]]) -> tf.distribute.MirroredStrategy:
    return tf.distribute.MirroredStrategy(devices=list(devices) if devices else None)


@functools.lru_cache(maxsize=None)
def _multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    return tf.distribute.MultiWorkerMirroredStrategy()


def tf_config() -> dict:
    """The ``TF_CONFIG`` environment variable as a dict (``{}`` when unset); ``ValueError`` naming ``TF_CONFIG``
    when it is not a JSON object."""
    text = os.environ.get("TF_CONFIG", "{}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"the TF_CONFIG environment variable is not valid JSON ({error}); "
                         "see docs/distributed.md") from None
    if not isinstance(value, dict) or not isinstance(value.get("cluster", {}), dict):
        raise ValueError("the TF_CONFIG environment variable must be a JSON object with a \"cluster\" object; "
                         "see docs/distributed.md")
    return value


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files: always, except non-chief multi-worker workers."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:
        return True
    has_chief = "chief" in tf_config().get("cluster", {})
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)


def worker_id(strategy: tf.distribute.Strategy) -> str:
    """``"<task_type>-<task_id>"`` of this worker (``"worker-0"`` without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "worker-0"
    return f"{resolver.task_type}-{resolver.task_id}"
