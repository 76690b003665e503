"""Projected gradient descent (PGD, Madry et al. 2018) adversarial examples under L-inf and L2 budgets, also
against a classifier behind an input purification (BPDA with EOT, Athalye et al. 2018)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from jem_tf import seeds

NORMS = ("linf", "l2")


class PGD:
    """Untargeted projected gradient descent (PGD) that maximises the cross-entropy of ``logits_fn``
    within an ``eps``-ball; compiled once, for every batch size and budget.

    Args:
        logits_fn: Maps a float32 image batch to float32 logits (the attacked classifier).
        image_shape: ``(H, W, C)`` of the images.
        norm: ``"linf"`` (signed-gradient steps, box projection) or ``"l2"`` (normalised-gradient steps,
            ball projection).
        steps: PGD iterations. Default 20.
        value_range: Adversarial images are clipped to this box.
        random_start: Start at a uniformly random point of the ball (L2: random direction, random radius).
        preprocess: Optional defence ``preprocess(x, seed) -> x'`` applied before the classifier (e.g. SGLD
            refinement, :func:`jem_tf.model.generation.refinement_fn`); the attack then uses BPDA: the forward pass
            runs ``logits_fn(preprocess(x))`` and the backward pass treats ``preprocess`` as the identity,
            ``d loss / dx := d loss / dx'``. Default ``None``: attack ``logits_fn`` alone.
        eot_samples: With ``preprocess``, the gradient of each step is the mean over this many draws of the
            defence's randomness (expectation over transformation, EOT); use 1 for a deterministic defence.
            Default 1.

    Example:
        >>> attack = PGD(lambda x: model(x), image_shape=(8, 8, 1), norm="linf")
        >>> x_adv = attack(x, y, eps=0.1, seed=0)

    Reference:
        Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018 (BPDA, EOT).
    """

    def __init__(self, logits_fn: Callable[[tf.Tensor], tf.Tensor], *, image_shape: Sequence[int], norm: str,
                 steps: int = 20, value_range: Sequence[float] = (-1.0, 1.0), random_start: bool = True,
                 preprocess: Optional[Callable[[tf.Tensor, tf.Tensor], tf.Tensor]] = None, eot_samples: int = 1):
        if norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS}; received {norm!r}")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"`steps` must be an int >= 1; received {steps!r}")
        if not (isinstance(eot_samples, int) and eot_samples >= 1):
            raise ValueError(f"`eot_samples` must be an int >= 1; received {eot_samples!r}")
        self.norm, self.steps, self.random_start = norm, steps, random_start
        self.preprocess, self.eot_samples = preprocess, eot_samples
        self.value_range = tuple(float(v) for v in value_range)
        self.image_shape = tuple(int(d) for d in image_shape)
        self._logits_fn = logits_fn
        self._attack = tf.function(self._attack_graph, input_signature=[
            tf.TensorSpec([None, *self.image_shape], tf.float32), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.float32), tf.TensorSpec([2], tf.int64)])

    @staticmethod
    def _l2_norm(t):
        return tf.sqrt(tf.reduce_sum(tf.square(t), axis=[1, 2, 3], keepdims=True))

    def _loss_gradient(self, x, y, seed):
        """d CE / dx of the attacked model; behind a defence, BPDA: the gradient at the defended input
        x' = preprocess(x) (identity backward), averaged over ``eot_samples`` draws of its randomness."""
        if self.preprocess is None:
            points = [x]
        else:
            points = [self.preprocess(x, tf.random.experimental.stateless_fold_in(seed, j))
                      for j in range(self.eot_samples)]
        grads = []
        for point in points:
            with tf.GradientTape() as tape:
                tape.watch(point)
                loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, self._logits_fn(point)))
            grads.append(tape.gradient(loss, point))
        return grads[0] if len(grads) == 1 else tf.add_n(grads) / float(len(grads))

    def _attack_graph(self, x0, y, eps, step_size, seed):
        low, high = self.value_range
        if not self.random_start:
            delta = tf.zeros_like(x0)
        elif self.norm == "linf":
            delta = tf.random.stateless_uniform(tf.shape(x0), seed, -eps, eps)
        else:
            direction = tf.random.stateless_normal(tf.shape(x0), seed)
            radius = tf.random.stateless_uniform([tf.shape(x0)[0], 1, 1, 1], seed + seeds.PGD_START_RADIUS, 0.0, eps)
            delta = direction / (self._l2_norm(direction) + 1e-12) * radius
        x = tf.clip_by_value(x0 + delta, low, high)
        for i in tf.range(self.steps):
            step_seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(i, tf.int64) + seeds.PGD_FIRST_STEP)
            grad = self._loss_gradient(x, y, step_seed)
            if self.norm == "linf":
                x = x + step_size * tf.sign(grad)
                x = x0 + tf.clip_by_value(x - x0, -eps, eps)
            else:
                x = x + step_size * grad / (self._l2_norm(grad) + 1e-12)
                delta = x - x0
                x = x0 + delta * tf.minimum(1.0, eps / (self._l2_norm(delta) + 1e-12))
            x = tf.clip_by_value(x, low, high)
        return x

    def __call__(self, images: np.ndarray, labels: np.ndarray, *, eps: float, step_size: float = None,
                 seed: int = 0, batch_size: int = 256) -> np.ndarray:
        """Adversarial versions of ``images`` (float32, same shape).

        Args:
            images, labels: Clean images in ``value_range`` and their int labels ``[N]``.
            eps: Radius of the ball in input units (for inputs in [-1, 1], 8/255 of the [0, 1] pixel scale
                is ``eps = 16/255``). ``eps = 0`` returns the images.
            step_size: Step per iteration (default ``2.5 * eps / steps``).
            seed: Seed of the random start.
            batch_size: Images attacked at once.
        """
        if not eps >= 0:
            raise ValueError(f"`eps` must be >= 0; received {eps!r}")
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels).astype(np.int32)
        if images.shape[1:] != self.image_shape or labels.shape != (images.shape[0],):
            raise ValueError(f"Expected images [N, {', '.join(map(str, self.image_shape))}] and labels [N]; "
                             f"received {images.shape}, {labels.shape}")
        if eps == 0:
            return images.copy()
        step_size = 2.5 * eps / self.steps if step_size is None else float(step_size)
        out = []
        for start in range(0, len(images), batch_size):
            out.append(self._attack(images[start:start + batch_size], labels[start:start + batch_size],
                                    tf.constant(eps, tf.float32), tf.constant(step_size, tf.float32),
                                    tf.constant([seed, start], tf.int64)).numpy())
        return np.concatenate(out)
