"""The energy view of a classifier (JEM, Grathwohl et al. 2020).

A classifier with logits ``f(x)`` defines

* ``p(y|x)   = softmax(f(x))[y]``
* ``p(x, y) ∝ exp(f(x)[y])``                    (unnormalised)
* ``p(x)    ∝ sum_y exp(f(x)[y])``             (unnormalised)
* ``E(x)    = -logsumexp_y f(x)[y] = -log p(x) + log Z``

All functions take logits of shape ``[..., num_classes]`` and are numerically stable for
large logits (they use ``logsumexp``/``log_softmax``, never ``exp`` of a raw logit).

Reference:
    Grathwohl et al., "Your Classifier is Secretly an Energy Based Model and You Should
    Treat it Like One", ICLR 2020.
"""

from __future__ import annotations

import tensorflow as tf


def log_px(logits: tf.Tensor) -> tf.Tensor:
    """Unnormalised log-density ``log p(x) + log Z = logsumexp_y f(x)[y]``.

    Args:
        logits: Tensor ``[..., num_classes]``.

    Returns:
        Tensor ``[...]``.

    Example:
        >>> float(log_px(tf.constant([[0.0, 0.0]]))[0])  # log 2
        0.6931...
    """
    # logits -> log p(x) = logsumexp_y f(x)[y]
    return tf.reduce_logsumexp(logits, axis=-1)


def energy(logits: tf.Tensor) -> tf.Tensor:
    """Energy ``E(x) = -logsumexp_y f(x)[y]``; low energy means high density.

    Args:
        logits: Tensor ``[..., num_classes]``.

    Returns:
        Tensor ``[...]``.
    """
    return -log_px(logits)


def log_pxy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Unnormalised joint log-density ``log p(x, y) + log Z = f(x)[y]``.

    Args:
        logits: Tensor ``[batch, num_classes]``.
        labels: Integer tensor ``[batch]`` of class ids.

    Returns:
        Tensor ``[batch]``.
    """
    labels = tf.cast(labels, tf.int32)
    return tf.gather(logits, labels, axis=-1, batch_dims=1)


def conditional_energy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Energy of the joint, ``E(x, y) = -f(x)[y]``, used to sample ``p(x|y)``."""
    return -log_pxy(logits, labels)


def log_py_given_x(logits: tf.Tensor) -> tf.Tensor:
    """``log p(y|x) = f(x)[y] - logsumexp_y' f(x)[y']`` for every class."""
    return tf.nn.log_softmax(logits, axis=-1)


def p_y_given_x(logits: tf.Tensor) -> tf.Tensor:
    """Class probabilities ``p(y|x) = softmax(f(x))``."""
    return tf.nn.softmax(logits, axis=-1)
