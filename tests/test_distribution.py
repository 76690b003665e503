"""jem_tf.sampling.distribution: MirroredStrategy on 2 logical CPUs, and 2-worker MultiWorkerMirroredStrategy."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import free_port as _free_port

from jem_tf import JEM, ClassGaussian, SGLDSampler, small_cnn
from jem_tf.data import load_digits, make_semi_supervised_dataset
from jem_tf.run.splits import Split
from jem_tf.sampling.distribution import make_strategy, split_cpu

HELPER = os.path.join(os.path.dirname(__file__), "helpers", "multiworker_fit.py")

# Mirrored and single-device steps differ only in the order of floating-point sums (the
# cross-replica gradient all-reduce): measured <= 2e-8 after two steps.
TOLERANCE = 1e-6


def _build(pxy_weight=0.0, buffer_storage="float32", class_gaussian=False):
    extra = {}
    if class_gaussian:  # JEM++ starts, restarted often so that the Gaussian draws matter
        data = load_digits(seed=0)
        extra = dict(chain_init=ClassGaussian.fit(data.x_train, data.y_train, num_classes=10), restart_prob=0.5,
                     sampler=SGLDSampler(n_steps=3, noise_std=0.0, grad_clamp=1.0, clamp_range=(-1, 1)))
    model = JEM(small_cnn(num_classes=10, input_shape=(8, 8, 1), width=4, seed=0),
                **{"sampler": SGLDSampler(n_steps=3), **extra}, buffer_size=100, pxy_weight=pxy_weight, seed=0,
                buffer_storage=buffer_storage)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def _digits_batches(count):
    data = load_digits(seed=0)
    return tf.data.Dataset.from_tensor_slices((data.x_train[:count], data.y_train[:count])).batch(32)


@pytest.mark.integration
@pytest.mark.parametrize("pxy_weight, buffer_storage, class_gaussian",
                         [(0.0, "float32", False), (1.0, "float32", False), (0.0, "uint8", False),
                          (1.0, "float32", True)])
def test_mirrored_fit_equals_single_device_and_buffer_copies_are_identical(pxy_weight, buffer_storage,
                                                                            class_gaussian, tmp_path):
    # Two steps of global batch 32 (16 per replica). With a batch that splits unevenly, each replica's
    # mean loss is divided by the number of replicas, as Keras scales its own losses, so the update
    # differs slightly from the single-device one (see test_uneven_last_batch below).
    digits_batches = _digits_batches(64)
    single = _build(pxy_weight, buffer_storage, class_gaussian)
    buffer_before = single.replay_buffer.samples.numpy().copy()
    single.fit(digits_batches, epochs=1, verbose=0)

    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        mirrored = _build(pxy_weight, buffer_storage, class_gaussian)
    mirrored.fit(digits_batches, epochs=1, verbose=0)

    for a, b in zip(single.get_weights(), mirrored.get_weights()):
        np.testing.assert_allclose(a, b, atol=TOLERANCE)
    copies = [v.numpy() for v in mirrored.replay_buffer.samples.value.values]
    assert len(copies) == 2
    np.testing.assert_array_equal(copies[0], copies[1])
    if buffer_storage == "uint8":  # the same levels, but for chains within float round-off of a level edge
        differ = copies[0].astype(int) - single.replay_buffer.samples.numpy().astype(int)
        assert np.abs(differ).max() <= 1 and np.mean(differ != 0) < 1e-3
    else:
        np.testing.assert_allclose(copies[0], single.replay_buffer.samples.numpy(), atol=TOLERANCE)
    # Both replicas' chains were written back: as many slots changed as in single-device training,
    # more than one replica's share (32 chains per term) could change.
    changed = np.any(copies[0] != buffer_before, axis=(1, 2, 3)).sum()
    assert changed == np.any(single.replay_buffer.samples.numpy() != buffer_before, axis=(1, 2, 3)).sum()
    assert changed > 32

    path = str(tmp_path / "mirrored.keras")
    mirrored.save(path)
    with strategy.scope():
        restored = keras.models.load_model(path)
    for copy in restored.replay_buffer.samples.value.values:
        np.testing.assert_array_equal(copy.numpy(), copies[0])
    for a, b in zip(restored.get_weights(), mirrored.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(restored.optimizer.iterations.numpy()) == 2


@pytest.mark.integration
def test_uneven_last_batch_keeps_copies_identical_and_draws_like_single_device():
    digits_batches = _digits_batches(45)  # batches of 32 and 13 (split 7 + 6 over the replicas)
    single = _build()
    single.fit(digits_batches, epochs=1, verbose=0)
    with make_strategy("mirrored").scope():
        mirrored = _build()
    mirrored.fit(digits_batches, epochs=1, verbose=0)
    copies = [v.numpy() for v in mirrored.replay_buffer.samples.value.values]
    np.testing.assert_array_equal(copies[0], copies[1])
    # Same slots drawn and written as on one device (the chains differ by the small update difference).
    initial = _build().replay_buffer.samples.numpy()
    changed_single = np.any(single.replay_buffer.samples.numpy() != initial, axis=(1, 2, 3))
    changed_mirrored = np.any(copies[0] != _build().replay_buffer.samples.numpy(), axis=(1, 2, 3))
    np.testing.assert_array_equal(changed_single, changed_mirrored)
    for a, b in zip(single.get_weights(), mirrored.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_make_strategy_reuses_one_mirrored_instance_per_process():
    # Two instances over the same devices would collide on collective keys (see distribution.py).
    assert make_strategy("mirrored") is make_strategy("mirrored")
    assert make_strategy("default") is tf.distribute.get_strategy()


def test_strategy_errors():
    with pytest.raises(ValueError, match="gpus"):
        make_strategy("gpus")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        make_strategy("multi_worker")
    with pytest.raises(ValueError, match="already initialised"):
        split_cpu(3)


def test_a_malformed_tf_config_is_named(monkeypatch):
    from jem_tf.sampling.distribution import make_strategy, tf_config

    monkeypatch.setenv("TF_CONFIG", "{'cluster': oops")
    with pytest.raises(ValueError, match="the TF_CONFIG environment variable is not valid JSON"):
        tf_config()
    with pytest.raises(ValueError, match="TF_CONFIG"):
        make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", '["a list"]')
    with pytest.raises(ValueError, match="TF_CONFIG environment variable must be a JSON object"):
        tf_config()


@pytest.mark.integration
def test_semi_supervised_training_under_mirrored_strategy():
    """Two replicas, semi-supervised batches: the replay-buffer copies stay identical, the loss is finite, and the
    labels of unlabelled rows still never matter."""
    import keras

    from jem_tf import JEM, small_cnn
    from jem_tf.sampling.distribution import make_strategy

    data = load_digits(seed=0)
    labelled = Split(data.x_train[:30], data.y_train[:30])
    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    results = []
    for scramble in (False, True):
        x = data.x_train[:64]
        dataset = make_semi_supervised_dataset(x, labelled.images, labelled.labels, batch_size=16,
                                               labelled_batch_size=16, seed=0, first_epoch=0, num_epochs=1)
        if scramble:  # wrong labels on every unlabelled row (weight 0)
            dataset = dataset.map(lambda images, labels, weights: (
                images, tf.where(weights > 0, labels, (labels + 3) % 10), weights))
        with strategy.scope():
            model = JEM(small_cnn(num_classes=10, input_shape=(8, 8, 1), width=4, seed=0), buffer_size=100, seed=0,
                        data_noise_std=0.0, restart_prob=0.0, sampler=SGLDSampler(n_steps=2, noise_std=0.0))
            model.compile(optimizer=keras.optimizers.Adam(1e-3))
        history = model.fit(dataset, epochs=1, steps_per_epoch=4, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
        copies = [v.numpy() for v in model.replay_buffer.samples.value.values]
        np.testing.assert_array_equal(copies[0], copies[1])
        results.append([v.numpy() for v in model.trainable_variables])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class _Cluster:
    """Two local worker processes running tests/helpers/multiworker_fit.py."""

    def __init__(self, tmp_path, epochs):
        self.ports = [_free_port(), _free_port()]
        self.out, self.workdir, self.epochs = tmp_path / "out", tmp_path / "work", epochs
        self.out.mkdir()
        self.logs = tmp_path
        self.procs = []

    def launch(self, tag, event_of_worker_1=()):
        """Starts both workers; ``event_of_worker_1``: ``(EVENT_FILE, EPOCH, BATCH)`` where worker 1 stops and waits."""
        self.procs = []
        for index in range(2):
            tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in self.ports]},
                         "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2"}
            log = open(self.logs / f"worker{index}-{tag}.log", "w")
            self.procs.append(subprocess.Popen(
                [sys.executable, HELPER, str(self.out), str(self.workdir), str(self.epochs),
                 *([str(a) for a in event_of_worker_1] if index == 1 else [])],
                env=env, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout):
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        finally:
            self.kill()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def log(self, index, tag):
        return (self.logs / f"worker{index}-{tag}.log").read_text()

    def results(self):
        return [np.load(self.out / f"worker-{i}.npz") for i in range(2)]


def _assert_identical(a, b):
    assert a.files == b.files
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_multi_worker_fit_ends_with_identical_weights_and_buffers(tmp_path):
    cluster = _Cluster(tmp_path, epochs=2)
    cluster.launch("run")
    codes = cluster.wait(timeout=240)
    assert codes == [0, 0], cluster.log(0, "run")[-3000:] + cluster.log(1, "run")[-3000:]
    a, b = cluster.results()
    _assert_identical(a, b)
    assert int(a["iterations"]) == 16  # 256 images / global batch 32 x 2 epochs
    assert int(a["resumed_from"]) == -1
    assert not np.array_equal(a["buffer"], JEM(small_cnn(num_classes=10, input_shape=(8, 8, 1), width=8, seed=0),
                                               buffer_size=200, seed=0).replay_buffer.samples.numpy())


@pytest.mark.slow
def test_multi_worker_killed_worker_restarts_from_backup(tmp_path):
    cluster = _Cluster(tmp_path, epochs=6)
    event = tmp_path / "event"
    cluster.launch("first", event_of_worker_1=(event, 2, 3))  # worker 1 stops in epoch 3 and waits
    deadline = time.time() + 180
    while not event.exists():
        if time.time() > deadline or any(p.poll() is not None for p in cluster.procs):
            cluster.kill()
            pytest.fail("worker 1 did not reach epoch 3:\n" + cluster.log(0, "first")[-3000:])
        time.sleep(0.1)
    cluster.procs[1].send_signal(signal.SIGKILL)  # a worker dies mid-run (in epoch 3, two epochs backed up)
    try:
        # The survivor notices the missing heartbeats and fails its collectives.
        assert cluster.procs[0].wait(timeout=90) != 0
    finally:
        cluster.kill()
    assert os.listdir(cluster.out) == []  # neither worker finished: the kill landed mid-run
    assert sorted(os.listdir(cluster.workdir / "backup")) == ["epoch_0001", "epoch_0002"]
    cluster.launch("second")  # the cluster manager restarts the job with the same command
    codes = cluster.wait(timeout=240)
    assert codes == [0, 0], cluster.log(0, "second")[-3000:]
    assert "Resuming from the backup" in cluster.log(0, "second")
    a, b = cluster.results()
    _assert_identical(a, b)
    assert int(a["resumed_from"]) == 2
    assert int(a["iterations"]) == 6 * 8  # all six epochs' steps, none repeated or lost
