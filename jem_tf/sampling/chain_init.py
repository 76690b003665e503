"""Where SGLD chains start: JEM++'s informative initialisation, per-class Gaussians of the training images.

JEM starts (and restarts) its chains from uniform noise; with few SGLD steps such chains never reach the
data's energy, and the contrastive term only teaches "data versus noise". JEM++ (Yang & Ji, ICCV 2021)
starts them from ``N(mu_y, Sigma_y)``, the mean and covariance of class ``y``'s training images: blurry
but image-like starting points from which 5-10 steps suffice. :class:`ClassGaussian` fits those
Gaussians once, holds them as non-trainable weights (saved with the model, its checkpoints and backups,
and exported with the serving ``sample`` signature) and draws from them in-graph, seeded and clipped to
the data's value range.

Covariance. Each class's covariance is kept as a factor ``F`` (``[D, R]``) plus a per-pixel standard
deviation ``s`` (``[D]``), and a draw is ``mu + F z + s * e`` with ``z ~ N(0, I_R)``, ``e ~ N(0, I_D)``:

* **full** (``rank = D``, the default for images of up to ``max_full_dim`` = 1,024 values, e.g. 28x28x1):
  ``F = V sqrt(Lambda)`` from the eigendecomposition of the sample covariance and ``s = 0``: exactly
  ``N(mu, Sigma)`` (an eigendecomposition, unlike a Cholesky factor, also handles the singular
  covariance of pixels that are constant in every image, such as Fashion-MNIST's borders).
* **low-rank + diagonal** (larger images: a full 3,072 x 3,072 factor per CIFAR class is 377 MB for ten
  classes, and drawing from it costs ``D^2`` per image): ``F`` holds the top ``R`` principal directions
  (default 256) and ``s`` the remaining variance of each pixel, so every pixel keeps its exact variance and
  the ``R`` strongest correlations are kept (probabilistic PCA with a per-pixel rather than shared
  residual).
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from jem_tf import seeds
from jem_tf.data.inputs import check_value_range
from jem_tf.errors import UsageError
from jem_tf.sampling.distribution import BatchPosition, replica_random

DEFAULT_MAX_FULL_DIM = 1024
DEFAULT_LOW_RANK = 256


@keras.saving.register_keras_serializable(package="jem_tf")
class ClassGaussian(keras.layers.Layer):
    """Per-class Gaussians of images, fitted with :meth:`fit`, drawn from with :meth:`sample`.

    Args:
        image_shape: Shape of one image, e.g. ``(28, 28, 1)``.
        num_classes: Number of classes.
        rank: Columns of each class's covariance factor: ``D`` (the image's size) for a full covariance.
        value_range: ``(low, high)``: draws are clipped to it. Default (-1, 1).

    A freshly constructed layer holds zeros (every draw is ``clip(0)``); :meth:`fit` returns a fitted one.

    Example:
        >>> init = ClassGaussian.fit(x_train, y_train, num_classes=10)
        >>> x0 = init.sample(64, seed=[0, 1])                         # classes drawn with the class prior
        >>> x0 = init.sample(64, seed=[0, 1], labels=tf.fill([64], 3))  # all from class 3

    Reference:
        Yang & Ji, "JEM++: Improved Techniques for Training JEM", ICCV 2021 (informative initialisation).
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, rank: int,
                 value_range: Sequence[float] = (-1.0, 1.0), **kwargs):
        kwargs.setdefault("dtype", "float32")  # statistics and draws stay float32 under mixed precision
        super().__init__(**kwargs)
        image_shape = tuple(int(d) for d in image_shape)
        dim = int(np.prod(image_shape)) if image_shape else 0
        if not image_shape or any(d < 1 for d in image_shape):
            raise ValueError(f"`image_shape` must be positive dimensions; received {image_shape!r}")
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"`num_classes` must be an int >= 1; received {num_classes!r}")
        if not (isinstance(rank, int) and 1 <= rank <= dim):
            raise ValueError(f"`rank` must be an int in [1, {dim}] (the image's size); received {rank!r}")
        value_range = check_value_range(value_range)
        self.image_shape, self.num_classes, self.rank, self.value_range = image_shape, num_classes, rank, value_range
        self.dim = dim

        def weight(name, shape):
            return self.add_weight(name=name, shape=shape, initializer="zeros", trainable=False, dtype="float32",
                                   autocast=False)

        self.means = weight("means", (num_classes, dim))
        self.factors = weight("factors", (num_classes, dim, rank))
        self.residual_stds = weight("residual_stds", (num_classes, dim))
        self.class_log_probs = weight("class_log_probs", (num_classes,))
        self.built = True

    @property
    def is_full_rank(self) -> bool:
        return self.rank == self.dim

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, *, num_classes: int, rank: Optional[int] = None,
            max_full_dim: int = DEFAULT_MAX_FULL_DIM, value_range: Sequence[float] = (-1.0, 1.0),
            name: str = "chain_init") -> "ClassGaussian":
        """Fits one Gaussian per class to ``images`` ``[N, *image_shape]`` with int ``labels`` ``[N]``.

        Args:
            images, labels: Training images (in ``value_range``) and their class ids.
            num_classes: Number of classes; every class needs at least two images.
            rank: Columns of the covariance factor. Default: full (``D``) if ``D <= max_full_dim``, else
                ``min(256, D)`` principal directions plus a per-pixel residual (see the module docstring).
            max_full_dim: Largest image size ``D`` that gets a full covariance by default. Default 1,024.
            value_range: Range that draws are clipped to. Default (-1, 1).

        Statistics are computed in float64 (sample mean, covariance with ``1/N``, as JEM++ does); the class
        prior is the classes' frequency in ``labels``.
        """
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim < 2 or labels.shape != (images.shape[0],):
            raise ValueError(f"`images` [N, ...] and `labels` [N] must match; received {images.shape} and "
                             f"{labels.shape}")
        if not np.all(np.isfinite(images)):
            raise ValueError("`images` contain NaN or infinite values.")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"`labels` must be class ids in [0, {num_classes}); found {labels.min()}..{labels.max()}")
        counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
        if counts.min() < 2:
            raise UsageError(f"Every class needs at least 2 images to fit its Gaussian; counts per class: "
                             f"{counts.tolist()}")
        image_shape = images.shape[1:]
        dim = int(np.prod(image_shape))
        if rank is None:
            rank = dim if dim <= max_full_dim else min(DEFAULT_LOW_RANK, dim)
        layer = cls(image_shape, num_classes, rank, value_range=value_range, name=name)
        flat = images.reshape(len(images), dim).astype(np.float64)
        means = np.zeros((num_classes, dim))
        factors = np.zeros((num_classes, dim, rank))
        residual = np.zeros((num_classes, dim))
        for k in range(num_classes):
            members = flat[labels == k]
            means[k] = members.mean(axis=0)
            centred = members - means[k]
            covariance = centred.T @ centred / len(members)
            eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
            eigenvalues = np.clip(eigenvalues[::-1][:rank], 0.0, None)
            eigenvectors = eigenvectors[:, ::-1][:, :rank]
            factors[k] = eigenvectors * np.sqrt(eigenvalues)
            if rank < dim:
                kept = np.sum(factors[k] ** 2, axis=1)
                residual[k] = np.sqrt(np.clip(np.diag(covariance) - kept, 0.0, None))
        layer.means.assign(means.astype(np.float32))
        layer.factors.assign(factors.astype(np.float32))
        layer.residual_stds.assign(residual.astype(np.float32))
        layer.class_log_probs.assign(np.log(counts / counts.sum()).astype(np.float32))
        return layer

    def draw_labels(self, num, seed, position: Optional[BatchPosition] = None) -> tf.Tensor:
        """``num`` int32 class ids drawn with the class prior (the training split's class frequencies)."""
        num = tf.cast(num, tf.int32)
        uniform = replica_random(tf.random.stateless_uniform, tf.reshape(num, [1]), position,
                                 seed=tf.cast(tf.convert_to_tensor(seed), tf.int64))
        # Inverse-CDF draw (a categorical draw whose random numbers slice per replica).
        cdf = tf.math.cumsum(tf.exp(self.class_log_probs))
        return tf.minimum(tf.searchsorted(cdf, uniform, side="right"), self.num_classes - 1)

    def sample(self, num, seed, labels: Optional[tf.Tensor] = None,
               position: Optional[BatchPosition] = None) -> tf.Tensor:
        """Draws ``num`` images ``[num, *image_shape]`` (float32, clipped to ``value_range``).

        Args:
            num: Number of images (int or scalar tensor).
            seed: Shape-[2] integer seed; the same seed gives the same images.
            labels: Optional int ``[num]`` class ids; default: classes drawn from the class prior.
            position: Optional ``(offset, global_batch_size)``: the random numbers of the global batch,
                of which this replica keeps its rows (see :mod:`jem_tf.sampling.distribution`).
        """
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
        class_seed, latent_seed, residual_seed = (
            seeds.fold(seed, salt) for salt in (seeds.INIT_CLASS, seeds.INIT_LATENT, seeds.INIT_RESIDUAL))
        num = tf.cast(num, tf.int32)
        if labels is None:
            labels = self.draw_labels(num, class_seed, position=position)
        labels = tf.cast(labels, tf.int32)
        latent = replica_random(tf.random.stateless_normal, tf.stack([num, self.rank]), position, seed=latent_seed)
        # [K, num, D]: every class's factor applied to the latents, then each row keeps its own class. This
        # costs K * num * D * R, far less than gathering a [num, D, R] factor per row.
        correlated = tf.einsum("nr,kdr->knd", latent, self.factors)
        x = tf.gather(self.means, labels) + tf.einsum("nk,knd->nd", tf.one_hot(labels, self.num_classes), correlated)
        if not self.is_full_rank:
            residual = replica_random(tf.random.stateless_normal, tf.stack([num, self.dim]), position,
                                      seed=residual_seed)
            x += tf.gather(self.residual_stds, labels) * residual
        low, high = self.value_range
        return tf.reshape(tf.clip_by_value(x, low, high), tf.concat([[num], self.image_shape], axis=0))

    def call(self, inputs=None):
        raise NotImplementedError("ClassGaussian is not called; use `sample`.")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"image_shape": list(self.image_shape), "num_classes": self.num_classes, "rank": self.rank,
                       "value_range": list(self.value_range)})
        return config


def flat_fields(shape, seed, *, value_range: Sequence[float]) -> tf.Tensor:
    """Low-frequency images ``shape`` = ``[N, H, W, C]``: per image, a 2x2 grid of uniform random colours on
    ``value_range``, pulled towards its mean colour by a uniform random factor in [0, 1] (0: one colour
    everywhere) and bilinearly stretched to ``H x W``. Images with no detail at all: a density that only ever
    sees chains near the data (or pixel noise) never learns that they are unlikely."""
    low, high = value_range
    shape = tf.cast(shape, tf.int32)
    num, channels = shape[0], shape[-1]
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    grid = tf.random.stateless_uniform(tf.stack([num, 2, 2, channels]), seed=seed, minval=low, maxval=high)
    spread = tf.random.stateless_uniform(tf.stack([num, 1, 1, 1]), seed=seeds.fold(seed, seeds.FRESH_FLAT_SPREAD))
    mean = tf.reduce_mean(grid, axis=[1, 2], keepdims=True)
    grid = mean + spread * (grid - mean)
    # align_corners-style stretch: the four colours sit in the corners, every pixel between is interpolated.
    rows = tf.linspace(0.0, 1.0, shape[1])[None, :, None, None]
    cols = tf.linspace(0.0, 1.0, shape[2])[None, None, :, None]
    top = grid[:, :1, :1] * (1 - cols) + grid[:, :1, 1:] * cols
    bottom = grid[:, 1:, :1] * (1 - cols) + grid[:, 1:, 1:] * cols
    return top * (1 - rows) + bottom * rows


def check_flat_fraction(flat_fraction, *, uniform_fraction: float, image_shape: Sequence[int]) -> None:
    """Raises ``ValueError`` unless ``flat_fraction`` is a share in [0, 1] that, with ``uniform_fraction``, leaves
    at most every row, for images ``[H, W, C]`` when it is above 0 (the one rule of :func:`start_chains` and
    :class:`~jem_tf.sampling.replay_buffer.ReplayBuffer`)."""
    if not (isinstance(flat_fraction, (int, float)) and 0.0 <= flat_fraction <= 1.0):
        raise ValueError(f"`flat_fraction` must be in [0, 1]; received flat_fraction={flat_fraction!r}")
    if flat_fraction > 0 and len(image_shape) != 3:
        raise ValueError(f"`flat_fraction` > 0 needs images [H, W, C]; received image_shape={tuple(image_shape)}")
    if uniform_fraction + flat_fraction > 1:
        raise ValueError(f"`uniform_fraction` + `flat_fraction` must be at most 1; received {uniform_fraction} + "
                         f"{flat_fraction}")


def start_chains(num, seed, *, image_shape: Sequence[int], value_range: Sequence[float],
                 init: Optional[ClassGaussian] = None, uniform_fraction: float = 0.0, flat_fraction: float = 0.0,
                 labels: Optional[tf.Tensor] = None, position: Optional[BatchPosition] = None) -> tf.Tensor:
    """``num`` float32 chain starts ``[num, *image_shape]``: the one start distribution of every SGLD chain, the
    replay buffer's fills and restarts in training, :meth:`jem_tf.JEM.sample` and the served ``sample`` signature
    (the same seed, the same starts).

    Uniform noise on ``value_range`` without ``init`` (the paper's JEM); with a fitted :class:`ClassGaussian`,
    its Gaussians of ``labels`` (a row of -1, or ``labels=None``: a class drawn with the class prior), of which a
    ``uniform_fraction`` share of rows (picked at random) is replaced by uniform noise. A ``flat_fraction`` share
    of rows (with or without ``init``; images ``[H, W, C]`` only) starts from :func:`flat_fields` instead.
    ``position``: the random numbers of the global batch, of which this replica keeps its rows
    (:mod:`jem_tf.sampling.distribution`).

    Example:
        >>> x0 = start_chains(16, tf.constant([0, 0], tf.int64), image_shape=(8, 8, 1), value_range=(-1, 1))
    """
    low, high = value_range
    # Without init every row is uniform noise and uniform_fraction is moot.
    check_flat_fraction(flat_fraction, uniform_fraction=0.0 if init is None else uniform_fraction,
                        image_shape=image_shape)
    shape = tf.concat([tf.reshape(tf.cast(num, tf.int32), [1]), tf.constant(list(image_shape), tf.int32)], axis=0)

    def uniform_noise(shape, seed):
        return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)

    if init is None:
        chains, uniform_fraction = replica_random(uniform_noise, shape, position, seed=seed), 0.0
    else:
        if labels is not None:  # -1 rows: the class ClassGaussian.sample would draw for the row without labels
            drawn = init.draw_labels(num, seeds.fold(tf.cast(seed, tf.int64), seeds.INIT_CLASS), position=position)
            labels = tf.where(labels >= 0, labels, drawn)
        chains = init.sample(num, seed, labels=labels, position=position)
    if uniform_fraction == 0 and flat_fraction == 0:
        return chains
    pick = replica_random(tf.random.stateless_uniform, shape[:1], position,
                          seed=seeds.fold(seed, seeds.FRESH_PICK_UNIFORM))
    row = [-1] + [1] * len(image_shape)
    if uniform_fraction > 0:
        noise = replica_random(uniform_noise, shape, position, seed=seeds.fold(seed, seeds.FRESH_UNIFORM))
        chains = tf.where(tf.reshape(pick < uniform_fraction, row), noise, chains)
    if flat_fraction > 0:
        flat = replica_random(lambda shape, seed: flat_fields(shape, seed, value_range=value_range), shape, position,
                              seed=seeds.fold(seed, seeds.FRESH_FLAT))
        # The rows after the uniform ones: the same pick, so that a uniform share keeps its rows and seeds.
        picked = (pick >= uniform_fraction) & (pick < uniform_fraction + flat_fraction)
        chains = tf.where(tf.reshape(picked, row), flat, chains)
    return chains
