"""jem_tf.training.callbacks: rotating checkpoints, sample grids, and the backup a run resumes from."""

import os

import numpy as np
import pytest
from conftest import tiny_jem

from jem_tf.training.callbacks import ChiefBackupAndRestore, RotatingCheckpoint, SampleGridCallback


@pytest.mark.integration
def test_rotating_checkpoint_keeps_last_k_and_leaves_no_temporary_files(tiny_data, tmp_path):
    x, y = tiny_data
    model = tiny_jem()
    directory = str(tmp_path / "ckpt")
    callback = RotatingCheckpoint(directory, keep=2)
    model.fit(x, y, batch_size=48, epochs=4, verbose=0, callbacks=[callback])
    assert sorted(os.listdir(directory)) == ["epoch_0003.keras", "epoch_0004.keras"]
    assert [os.path.basename(p) for p in callback.checkpoints()] == ["epoch_0003.keras", "epoch_0004.keras"]
    with pytest.raises(ValueError, match="keep"):
        RotatingCheckpoint(directory, keep=0)


@pytest.mark.integration
def test_sample_grid_callback_writes_png_of_buffer(tiny_data, tmp_path):
    x, y = tiny_data
    model = tiny_jem()
    png = str(tmp_path / "samples.png")
    callback = SampleGridCallback(log_dir=str(tmp_path / "logs"), png_path=png, num_images=9, every_epochs=1)
    model.fit(x, y, batch_size=48, epochs=1, verbose=0, callbacks=[callback])
    assert open(png, "rb").read(4) == b"\x89PNG"
    assert os.listdir(tmp_path / "logs" / "samples")


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
