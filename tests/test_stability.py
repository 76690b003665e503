"""Fault injection: divergence rollback, SIGKILL + exact resume, corrupt backups, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import tiny_jem

from jem_tf import JEM, SGLDSampler, small_cnn
from jem_tf.data import load_digits
from jem_tf.training.callbacks import ChiefBackupAndRestore
from jem_tf.training.schedules import ScaledSchedule, WarmupPiecewiseSchedule
from jem_tf.training.stability import StabilityGuard, TrainingDiverged


class PoisonWeights(keras.callbacks.Callback):
    """Test hook: sets the first kernel to NaN after the given optimizer steps (a blown-up update), once
    per step unless ``repeat`` (a rollback rewinds the step counter)."""

    def __init__(self, steps, repeat=False):
        super().__init__()
        self.steps = set(steps)
        self.repeat = repeat

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step in self.steps:
            if not self.repeat:
                self.steps.discard(step)
            kernel = self.model.backbone.trainable_variables[0]
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))


def _digits_jem(seed=0):
    model = JEM(small_cnn(num_classes=10, input_shape=(8, 8, 1), width=8, seed=seed),
                sampler=SGLDSampler(n_steps=5), buffer_size=500, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(WarmupPiecewiseSchedule(3e-3, warmup_steps=10)))
    return model


@pytest.mark.integration
def test_nan_divergence_is_rolled_back_and_training_recovers():
    data = load_digits(seed=0)
    x, y = data.x_train[:600], data.y_train[:600]
    clean = _digits_jem()
    clean.fit(x, y, batch_size=32, epochs=8, verbose=0, shuffle=False)
    clean_accuracy = clean.evaluate(data.x_test, data.y_test, return_dict=True, verbose=0)["accuracy"]

    messages = []
    # lr_factor 1: the recovered run differs from the clean one only by the rollback and the reseed.
    guard = StabilityGuard(snapshot_every_steps=10, lr_factor=1.0, log=messages.append)
    model = _digits_jem()
    # The poison hook runs before the guard: step 60's update "explodes", step 61's loss is NaN.
    model.fit(x, y, batch_size=32, epochs=8, verbose=0, shuffle=False, callbacks=[PoisonWeights({60}), guard])
    guard.raise_if_failed()
    assert len(guard.rollbacks) == 1
    event = guard.rollbacks[0]
    assert event["step"] == 61 and "not finite" in event["reason"] and event["restored_step"] <= 60
    assert event["reseeds"] == 1 and int(model.seed_state.reseeds.numpy()) == 1
    assert any("Rolled back" in m for m in messages)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    accuracy = model.evaluate(data.x_test, data.y_test, return_dict=True, verbose=0)["accuracy"]
    # Measured: clean 0.806, recovered 0.828 (seed 0; with lr_factor 0.5: 0.747). Comparable: within 0.1
    # and far above chance (0.1).
    assert accuracy > 0.7 and abs(accuracy - clean_accuracy) < 0.1, (accuracy, clean_accuracy)


@pytest.mark.integration
def test_guard_gives_up_after_max_rollbacks(tiny_data):
    x, y = tiny_data
    model = tiny_jem()
    guard = StabilityGuard(max_rollbacks=2, snapshot_every_steps=1, log=lambda m: None)
    poison = PoisonWeights(range(1, 100), repeat=True)  # every update explodes
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[poison, guard])
    assert len(guard.rollbacks) == 2 and model.stop_training
    with pytest.raises(TrainingDiverged, match="2 rollback"):
        guard.raise_if_failed()


def test_guard_bounds(tiny_data):
    model = tiny_jem()
    guard = StabilityGuard(max_abs_energy=100, max_energy_gap=10, max_sample_abs=3)
    guard.set_model(model)
    assert guard.diagnose({"loss": 1.0, "e_data": -5.0, "e_sample": -4.0, "energy_gap": -1.0,
                           "sample_abs_max": 1.2}) is None
    assert "loss is not finite" in guard.diagnose({"loss": float("nan")})
    assert "|e_sample| = 500" in guard.diagnose({"e_sample": -500.0})
    assert "max_energy_gap" in guard.diagnose({"energy_gap": 20.0})
    assert "left the data range" in guard.diagnose({"sample_abs_max": 4.0})
    default = StabilityGuard()  # sample bound: 10x the data range's largest magnitude, here 10
    default.set_model(model)
    assert default.diagnose({"sample_abs_max": 9.0}) is None
    assert "> 10" in default.diagnose({"sample_abs_max": 11.0})
    with pytest.raises(ValueError, match="lr_factor"):
        StabilityGuard(lr_factor=0)


@pytest.mark.integration
def test_guard_can_add_sgld_steps_and_reset_buffer(tiny_data):
    x, y = tiny_data
    model = tiny_jem()
    guard = StabilityGuard(snapshot_every_steps=1, lr_factor=0.5, extra_sgld_steps=5, reset_buffer=True,
                           log=lambda m: None)
    model.replay_buffer.samples.assign(np.full(model.replay_buffer.samples.shape, 0.5, "float32"))
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[PoisonWeights({2}), guard])
    assert len(guard.rollbacks) == 1 and guard.rollbacks[0]["sgld_steps"] == 8
    assert model.sampler.n_steps == 8
    # tiny_jem's Adam(1e-3) has a plain rate: halved in place.
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(5e-4)
    assert not np.any(model.replay_buffer.samples.numpy() == 0.5)  # refilled with noise, then trained


def test_rollback_scales_a_learning_rate_schedule_and_keeps_training(tiny_data):
    x, y = tiny_data
    model = tiny_jem()
    model.compile(optimizer=keras.optimizers.Adam(WarmupPiecewiseSchedule(1e-3, warmup_steps=4)))
    guard = StabilityGuard(snapshot_every_steps=1, log=lambda m: None)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[PoisonWeights({2}), guard])
    assert len(guard.rollbacks) == 1
    schedule = model.optimizer._learning_rate
    assert isinstance(schedule, ScaledSchedule) and schedule.factor == 0.5
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(0.5e-3)  # past warm-up
    # 6 batches; the poisoned step 2 was never snapshotted, so step 3 rolled back to step 1: 1 + 3 more.
    assert int(model.optimizer.iterations.numpy()) == 4
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_scaled_schedule_round_trips():
    schedule = ScaledSchedule(ScaledSchedule(WarmupPiecewiseSchedule(1e-3), 0.5), 0.5)
    assert schedule.factor == 0.25 and float(schedule(100)) == pytest.approx(2.5e-4)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert again.get_config() == schedule.get_config()


# ------------------------------------------------------------------------------------- backups
def test_truncated_backup_is_detected_and_the_previous_one_is_used(tiny_data, tmp_path):
    x, y = tiny_data
    model = tiny_jem()
    backup = ChiefBackupAndRestore(str(tmp_path / "backup"), keep=2, log=lambda m: None)
    backup.on_train_end = lambda logs=None: None  # keep the backup as if the run had been killed
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[backup])
    assert [epoch for epoch, _ in backup.generations()] == [3, 2]
    newest = tmp_path / "backup" / "epoch_0003" / ChiefBackupAndRestore.WEIGHTS
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn by a crash
    messages = []
    fresh = tiny_jem()
    epoch = ChiefBackupAndRestore(str(tmp_path / "backup"), log=messages.append).restore(fresh)
    assert epoch == 2 and int(fresh.optimizer.iterations.numpy()) == 6
    assert "epoch_0003 is unreadable" in messages[0] and "Resuming" in messages[1]


def test_a_backup_that_does_not_load_leaves_no_partial_state(tiny_data, tmp_path):
    # A model of another shape (a bigger replay buffer) cannot load the backup: it must stay exactly as built,
    # not half-restored (optimizer step of the old run with fresh weights).
    x, y = tiny_data
    model = tiny_jem()
    backup = ChiefBackupAndRestore(str(tmp_path / "backup"), log=lambda m: None, delete_on_completion=False)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[backup])
    other = tiny_jem(buffer_size=128)
    other.optimizer.build(other.trainable_variables)
    before = [v.numpy().copy() for v in other.variables + other.optimizer.variables]
    messages = []
    assert ChiefBackupAndRestore(str(tmp_path / "backup"), log=messages.append).restore(other) == 0
    assert all("unreadable" in m for m in messages) and len(messages) == 2
    for variable, value in zip(other.variables + other.optimizer.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)
    assert backup.completed and os.path.isdir(tmp_path / "backup")  # kept until remove()
    backup.remove()
    assert not os.path.exists(tmp_path / "backup")


# Precision pinned: the reference and the victim are two runs, and "auto" probes the machine's speed (a
# resumed run reuses its own probe: tests/test_run.py).
RUN = [sys.executable, "-m", "jem_tf.train", "--precision", "float32", "--epochs", "4", "--width", "8",
       "--sgld-steps", "3", "--buffer-size", "300", "--batch-size", "32", "--validation-fraction", "0",
       "--num-sample-images", "4",
       "--warmup-steps", "20", "--learning-rate", "0.002", "--augment", "crop", "--verbose", "2"]


UNTIL_EVENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "train_until_event.py")


def _run(workdir, log_path, **kwargs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(RUN + ["--workdir", str(workdir)], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env=env, **kwargs)


def _final_state(workdir):
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))
    return model.get_weights(), model.replay_buffer.samples.numpy(), [v.numpy() for v in model.optimizer.variables]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = _run(tmp_path / "reference", tmp_path / "reference.log")
    assert reference.wait(timeout=400) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    # The victim stops after batch 20 of its epoch 3 (of 45), signals, and waits there: the kill lands mid-run.
    event = tmp_path / "event"
    victim = subprocess.Popen([sys.executable, UNTIL_EVENT, str(event), "batch:2:20", *RUN[3:], "--workdir",
                               str(tmp_path / "victim")], stdout=open(tmp_path / "first.log", "w"),
                              stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.time() + 300
    while not event.exists():
        assert victim.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    backup = tmp_path / "victim" / "backup"
    assert sorted(os.listdir(backup)) == ["epoch_0001", "epoch_0002"]  # killed in epoch 3: mid-run
    assert not (tmp_path / "victim" / "model.keras").exists()
    restarted = _run(tmp_path / "victim", tmp_path / "second.log")
    assert restarted.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert "Resuming from the backup" in log and "epoch(s) done" in log
    metrics = json.load(open(tmp_path / "victim" / "metrics.json"))
    assert metrics["resumed_from_epoch"] == 2 and metrics["steps"] == 4 * 45  # 1,437 images / 32

    weights, buffer, optimizer = _final_state(tmp_path / "victim")
    ref_weights, ref_buffer, ref_optimizer = _final_state(tmp_path / "reference")
    # Weights, optimizer slots and step, replay buffer, warm-up position, RNG and data order all resume:
    # the resumed run is bit-identical to the uninterrupted one.
    for a, b in zip(weights + [buffer] + optimizer, ref_weights + [ref_buffer] + ref_optimizer):
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "victim" / "backup").exists()  # removed once the run completed


# ------------------------------------------------------------------------------------- bad inputs
def _api_cases():
    from jem_tf import ReplayBuffer
    from jem_tf.data import load_dataset
    from jem_tf.run.config import TrainConfig
    from jem_tf.sampling.distribution import make_strategy
    from jem_tf.serving import export_saved_model

    backbone = small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4)
    images = np.zeros((4, 8, 8, 1), "float32")
    return [
        ("JEM(px_weight=nan)", lambda: JEM(backbone, px_weight=float("nan")), "px_weight must be a finite number"),
        ("JEM(seed='0')", lambda: JEM(backbone, seed="0"), "seed must be an int; received seed='0'"),
        ("SGLDSampler(n_steps=2.5)", lambda: SGLDSampler(n_steps=2.5),
         "n_steps must be an int >= 1; received n_steps=2.5"),
        ("ReplayBuffer(size=-5)", lambda: ReplayBuffer(image_shape=(2,), size=-5),
         "size must be an int >= 1; received size=-5"),
        ("fit(labels=[0,1,2,7])", lambda: tiny_jem().fit(images, np.array([0, 1, 2, 7]), verbose=0),
         "integer class ids in [0, 3); received label 7"),
        ("fit(images*300)", lambda: tiny_jem().fit(images + 300, np.zeros(4), verbose=0),
         "received values in [300, 300]"),
        ("fit(NaN images)", lambda: tiny_jem().fit(images * np.nan, np.zeros(4), verbose=0), "NaN"),
        ("fit(rank 3)", lambda: tiny_jem().fit(images[..., 0], np.zeros(4), verbose=0), "received (4, 8, 8)"),
        ("sample(init='noise')", lambda: tiny_jem().sample(2, init="noise"),
         "init must be one of ('default', 'uniform', 'class_gaussian', 'buffer'); received 'noise'"),
        ("load_dataset(missing data_dir)", lambda: load_dataset("mnist", data_dir="/no/such/dir"),
         "--data-dir '/no/such/dir' does not exist"),
        ("load_dataset('imagenet')", lambda: load_dataset("imagenet"), "Unknown dataset 'imagenet'"),
        ("make_strategy('gpu')", lambda: make_strategy("gpu"), "Unknown strategy 'gpu'"),
        ("TrainConfig.replace(lr=1)", lambda: TrainConfig().replace(lr=1), "Unknown config field(s) ['lr']"),
        ("TrainConfig(epochs=0).validate()", lambda: TrainConfig(epochs=0).validate(),
         "epochs must be an integer >= 1; received 0"),
        ("export(version=-1)", lambda: export_saved_model(tiny_jem(), "/tmp/x", version=-1, ood_threshold=0.0),
         "version must be an int >= 0; received -1"),
        ("export(no calibration)", lambda: export_saved_model(tiny_jem(), "/tmp/x"), "exactly one of"),
        ("StabilityGuard(max_rollbacks=-1)", lambda: StabilityGuard(max_rollbacks=-1),
         "max_rollbacks must be an int >= 0"),
        ("ChiefBackupAndRestore(keep=0)", lambda: ChiefBackupAndRestore("/tmp/b", keep=0), "keep must be >= 1"),
    ]


@pytest.mark.parametrize("index", range(18))
def test_api_bad_inputs_raise_value_errors_naming_the_value(index):
    name, call, message = _api_cases()[index]
    with pytest.raises(ValueError) as error:
        call()
    assert message.replace("`", "") in str(error.value).replace("`", ""), (name, str(error.value))


@pytest.mark.parametrize("argv, code, message", [
    (["--dataset", "fashion_mnist", "--data-dir", "/no/such/dir"], 2, "--data-dir '/no/such/dir' does not exist"),
    (["--max-rollbacks", "-1"], 2, "max_rollbacks must be an integer >= 0; received -1"),
    (["--rollback-lr-factor", "0"], 2, "rollback_lr_factor must be in (0, 1]; received 0.0"),
    (["--learning-rate", "nan"], 2, "learning_rate must be a finite number; received nan"),
    (["--stability-guard", "perhaps"], 2, "expected true or false, got 'perhaps'"),
])
def test_cli_bad_inputs_exit_2_with_one_line(argv, code, message, tmp_path, capsys):
    from jem_tf import train

    try:
        result = train.main(argv + ["--workdir", str(tmp_path / "w"), "--epochs", "1"])
    except SystemExit as exit_info:
        result = exit_info.code
    assert result == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("python -m jem_tf.train: error: ")
    assert not (tmp_path / "w" / "model.keras").exists()
