"""Image grids and PNG files, without a plotting library."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import tensorflow as tf


def image_grid(images: np.ndarray, *, value_range: Sequence[float] = (-1.0, 1.0), columns: int = 0,
               padding: int = 1) -> np.ndarray:
    """Tiles ``[N, H, W, C]`` images into one uint8 ``[rows*(H+p)+p, cols*(W+p)+p, C]`` image.

    Values are clipped to ``value_range`` and mapped to 0..255; padding is mid-grey.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"`images` must be [N, H, W, C]; received shape {images.shape}")
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    low, high = value_range
    pixels = np.round((np.clip(images, low, high) - low) / (high - low) * 255.0).astype(np.uint8)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 128, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling, so that 8x8 digits are visible in a PNG viewer."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def write_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 ``[H, W, C]`` image (C = 1 or 3) to ``path`` atomically."""
    data = tf.io.encode_png(tf.constant(image, tf.uint8)).numpy()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
