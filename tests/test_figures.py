"""jem_tf.figures: image grids and PNG files."""

import numpy as np
import pytest

from jem_tf.figures import image_grid, upscale, write_png


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
