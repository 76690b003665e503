import os

import numpy as np
import pytest
from conftest import tiny_jem

from jem_tf.figures import image_grid, upscale, write_png
from jem_tf.training.callbacks import RotatingCheckpoint, SampleGridCallback


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


def test_image_grid_layout_and_scaling(tmp_path):
    images = np.stack([np.full((2, 3, 1), v, "float32") for v in (-1.0, 0.0, 1.0, 5.0, -5.0)])
    grid = image_grid(images, columns=3, padding=1)
    assert grid.shape == (1 + 2 * 3, 1 + 3 * 4, 1) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 128 and grid[1, 9, 0] == 255
    assert grid[4, 1, 0] == 255 and grid[4, 5, 0] == 0  # clipped to the value range
    assert upscale(grid, 2).shape == (14, 26, 1)
    write_png(str(tmp_path / "g.png"), grid)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="N, H, W, C"):
        image_grid(np.zeros((2, 3)))
