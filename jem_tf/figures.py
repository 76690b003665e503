"""Figures as PNG files, for training (sample grids) and evaluation (diagrams):

* image grids without a plotting library: :func:`image_grid` tiles images, :func:`upscale` enlarges
  them, :func:`write_png` writes them (``tf.io.encode_png``);
* evaluation figures drawn with matplotlib's object-oriented API (no pyplot, no display: works headless
  and leaves the process's matplotlib backend alone): :func:`reliability_diagram`,
  :func:`score_histograms` and :func:`energy_trace`.

Every file is written atomically (a temporary file, then renamed).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

from jem_tf.files import atomic_write_bytes, write_atomically


# ------------------------------------------------------------------------------------- image grids
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
    atomic_write_bytes(path, tf.io.encode_png(tf.constant(image, tf.uint8)).numpy())


# ------------------------------------------------------------------------------------- matplotlib figures
def _save(figure, path: str) -> str:
    # The temporary name ends in .png: savefig takes the format from it.
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, bbox_inches="tight"), suffix=".png")
    return path


def reliability_diagram(bins: Dict[str, list], path: str, *, title: str = "") -> str:
    """Per-bin accuracy (filled bars) and mean confidence (red outlines) with the diagonal of perfect
    calibration, and the share of examples per bin underneath."""
    from matplotlib.figure import Figure

    edges = np.asarray(bins["edges"])
    counts = np.asarray(bins["count"], dtype=np.float64)
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    figure = Figure(figsize=(4.5, 5.5))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = counts > 0
    top.bar(centers[filled], np.asarray(bins["accuracy"])[filled], width=width[filled], edgecolor="black",
            color="tab:blue", alpha=0.8, label="accuracy")
    top.bar(centers[filled], np.asarray(bins["confidence"])[filled], width=width[filled], fill=False,
            edgecolor="tab:red", linewidth=1.5, label="mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1)
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(title)
    top.legend(loc="upper left")
    bottom.bar(centers, counts / max(counts.sum(), 1), width=width, color="grey", edgecolor="black")
    bottom.set_xlabel("confidence (max p(y|x))")
    bottom.set_ylabel("share")
    bottom.set_xlim(0, 1)
    return _save(figure, path)


def score_histograms(scores: Dict[str, np.ndarray], path: str, *, title: str = "", xlabel: str = "score",
                     num_bins: int = 60) -> str:
    """Overlaid, density-normalised histograms of one OOD score on several datasets (the paper's log p(x)
    histogram figure). Non-finite values are dropped."""
    from matplotlib.figure import Figure

    finite = {name: np.asarray(v, dtype=np.float64)[np.isfinite(v)] for name, v in scores.items()}
    everything = np.concatenate([v for v in finite.values() if v.size] or [np.zeros(1)])
    low, high = np.percentile(everything, [0.5, 99.5])
    if not high > low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, num_bins + 1)
    figure = Figure(figsize=(6, 3.8))
    axes = figure.subplots()
    for name, values in finite.items():
        axes.hist(np.clip(values, low, high), bins=edges, density=True, histtype="stepfilled", alpha=0.4,
                  label=f"{name} (n={values.size})")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("density")
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _save(figure, path)


def energy_trace(steps: Sequence[int], energies: np.ndarray, path: str, *, reference: float = None,
                 title: str = "") -> str:
    """Mean energy (with min/max band) of SGLD chains against the step, and the data's mean energy."""
    from matplotlib.figure import Figure

    energies = np.asarray(energies, dtype=np.float64)  # [num_snapshots, num_chains]
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    axes.plot(steps, energies.mean(axis=1), label="chains (mean)")
    axes.fill_between(steps, energies.min(axis=1), energies.max(axis=1), alpha=0.25, label="chains (min-max)")
    if reference is not None:
        axes.axhline(reference, color="black", linestyle="--", linewidth=1, label="test data (mean)")
    axes.set_xlabel("SGLD step")
    axes.set_ylabel("energy")
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _save(figure, path)
