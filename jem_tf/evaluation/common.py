"""What every evaluation mode uses: batching, logits, input-gradient norms, SGLD refinement of inputs,
energies of logits and sample grids as PNG files."""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf

from jem_tf.figures import image_grid, upscale, write_png
from jem_tf.model import energy as energy_lib
from jem_tf.model.jem import JEM
from jem_tf.model.refinement import RefinementSettings


def batches(n: int, batch_size: int) -> Iterator[Tuple[int, int]]:
    """``(start, stop)`` of consecutive batches of ``batch_size`` (the last one possibly shorter) over ``n`` items."""
    return ((start, min(start + batch_size, n)) for start in range(0, n, batch_size))


def predict_logits(model: JEM, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """float32 logits ``[N, K]`` of the model in inference mode."""
    logits = [model.logits(tf.constant(images[a:b]), training=False).numpy()
              for a, b in batches(len(images), batch_size)]
    return np.concatenate(logits) if logits else np.zeros((0, model.num_classes), np.float32)


def input_gradient_norms(model: JEM, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """``||d log p(x) / dx||_2`` per image (one compiled function for every batch size)."""

    @tf.function(input_signature=[tf.TensorSpec([None, *model.image_shape], tf.float32)])
    def norms(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            log_px = tf.reduce_sum(energy_lib.log_px(model.logits(x)))
        grad = tape.gradient(log_px, x)
        return tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3]))

    return np.concatenate([norms(tf.constant(images[a:b])).numpy() for a, b in batches(len(images), batch_size)])


def refine_in_batches(model: JEM, images: np.ndarray, *, n_steps: Optional[int] = None,
                      settings: Optional[RefinementSettings] = None, seed: int = 0,
                      batch_size: int = 256) -> np.ndarray:
    """:meth:`JEM.refine` over batches with one seed per batch (reproducible for a seed): ``settings``
    (default the model's :attr:`~JEM.refinement_settings`), with ``n_steps`` steps when given."""
    settings = model.refinement_settings if settings is None else settings
    n_steps = settings.n_steps if n_steps is None else n_steps
    if n_steps == 0:
        return np.asarray(images, np.float32)
    return np.concatenate([model.refine(images[a:b], n_steps=n_steps, settings=settings,
                                        seed=np.array([seed, a], np.int64))
                           for a, b in batches(len(images), batch_size)])


def energies(logits: np.ndarray) -> np.ndarray:
    """``E(x) = -logsumexp_y f(x)[y]`` of numpy logits, in float64."""
    return -np.logaddexp.reduce(np.asarray(logits, np.float64), axis=1)


def _upscale_factor(image_shape) -> int:
    return max(1, 64 // int(image_shape[0]))


def save_grid(path: str, images: np.ndarray, model: JEM, columns: int = 0) -> str:
    """Writes ``images`` (in the model's value range) as one PNG grid at ``path``, upscaled by
    ``64 // image height`` (at least 1) so that small images stay visible; returns ``path``."""
    grid = image_grid(images, value_range=model.value_range, columns=columns)
    write_png(path, upscale(grid, _upscale_factor(model.image_shape)))
    return path
