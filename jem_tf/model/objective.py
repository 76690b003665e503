"""The JEM training objective as a pure function of logits.

``JEM.train_step`` samples, runs the network once and hands the logits to :func:`jem_objective`; the
objective itself knows nothing of samplers, buffers or optimizers, so it can be read and tested alone::

    loss =   pyx_weight * CE(f(x_data), y)                                  # y smoothed by label_smoothing
           + px_weight  * (mean E(x_data) - mean E(x_sample))              # contrastive log p(x)
           + pxy_weight * (mean E(x_data, y) - mean E(x_sample|y, y))       # optional log p(x|y)
           + energy_l2_weight * (mean (E(x_data) - c)^2 + mean (E(x_sample) - c)^2)  # optional regulariser
                                                     # (the samples' part only with energy_l2_samples)

with ``E(x) = -logsumexp_y f(x)[y]`` and ``E(x, y) = -f(x)[y]``. The regulariser's centre ``c``
(``energy_l2_center``, default 0) matters because an energy's offset is arbitrary: adding a constant to every
logit changes neither ``p(y|x)`` nor ``p(x)``. A classifier being converted has energies far from 0 (about -12
for a CIFAR-10 CNN); centring the L2 term on its mean energy penalises how far training moves the energies,
not an offset the classifier happened to learn. ``energy_l2_samples=False`` keeps the data's part only: it pins
the data's energies (and with them the scale of the logits, the classifier's confidence) near the centre and leaves
the samples' energies to the contrastive term alone (on the samples, the L2 term pulls chains that started far from
the data, e.g. at class-Gaussian blobs, *down* to the data's energy: against the contrastive term, and in a
conversion's first epoch the largest term of the loss). ``label_smoothing`` (``s``) trains the cross-entropy on
targets ``(1 - s) one_hot(y) + s / K`` (Szegedy et al. 2016; the fast CIFAR-10 trainings use 0.2); the logged
``ce`` is that loss, the evaluation's NLL stays the plain one. The energy terms can be gated off
(``energy_active`` false): a plain classifier's loss, for a warm start.

Semi-supervised batches: ``sample_weight`` weights the terms that use labels (the cross-entropy and the
conditional term) and nothing else, so a row of weight 0 is *unlabelled*: it trains ``p(x)`` alone, and
its label (any valid id) never reaches the loss.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from jem_tf.model import energy as energy_lib


class ObjectiveTerms(NamedTuple):
    """The loss and the terms that are logged. ``e_sample`` and ``energy_gap`` are ``None`` without
    the p(x) term."""

    loss: tf.Tensor  # scalar
    ce: tf.Tensor  # scalar, sample-weighted mean cross-entropy
    e_data: tf.Tensor  # [batch] energies of the data
    e_sample: Optional[tf.Tensor]  # [batch] energies of the p(x) samples
    energy_gap: Optional[tf.Tensor]  # scalar, mean E(x_data) - mean E(x_sample)


def jem_objective(labels, logits_data, *, logits_sample=None, logits_conditional_sample=None, sample_weight=None,
                  pyx_weight: float = 1.0, px_weight: float = 1.0, pxy_weight: float = 0.0,
                  energy_l2_weight: float = 0.0, energy_l2_center: float = 0.0, energy_l2_samples: bool = True,
                  energy_active=None, label_smoothing: float = 0.0) -> ObjectiveTerms:
    """The JEM loss of one batch (see the module docstring).

    Args:
        labels: int ``[batch]`` class ids of the data.
        logits_data: float32 ``[batch, K]`` logits of the (noised) data, computed in training mode.
        logits_sample: ``[M, K]`` logits of the unconditional SGLD samples; needed when ``px_weight > 0``.
        logits_conditional_sample: ``[batch, K]`` logits of the class-conditional samples (row i drawn for
            ``labels[i]``); needed when ``pxy_weight > 0``.
        sample_weight: Optional ``[batch]`` weights of the label terms (weighted means of the cross-entropy
            and of the conditional term); weight 0 = unlabelled row.
        pyx_weight, px_weight, pxy_weight, energy_l2_weight: The weights of the four terms.
        energy_l2_center: The energy the L2 term pulls towards (see the module docstring).
        energy_l2_samples: Whether the L2 term also pulls the samples' energies (default) or the data's only.
        energy_active: ``None`` (energy terms always on) or a boolean scalar tensor; when false the p(x),
            p(x|y) and L2 terms contribute 0.
        label_smoothing: Share ``s`` in ``[0, 1)`` of the cross-entropy's target spread evenly over the classes.

    Returns:
        :class:`ObjectiveTerms`.
    """
    if px_weight > 0 and logits_sample is None:
        raise ValueError("px_weight > 0 needs `logits_sample`.")
    if pxy_weight > 0 and logits_conditional_sample is None:
        raise ValueError("pxy_weight > 0 needs `logits_conditional_sample`.")
    if label_smoothing > 0:
        targets = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(logits_data)[-1], dtype=logits_data.dtype)
        ce_per_example = keras.losses.categorical_crossentropy(
            targets, logits_data, from_logits=True, label_smoothing=label_smoothing)
    else:
        ce_per_example = keras.losses.sparse_categorical_crossentropy(labels, logits_data, from_logits=True)
    if sample_weight is not None:
        sample_weight = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
        ce = tf.reduce_sum(ce_per_example * sample_weight) / tf.maximum(tf.reduce_sum(sample_weight), 1e-12)
    else:
        ce = tf.reduce_mean(ce_per_example)
    e_data = energy_lib.energy(logits_data)
    loss = pyx_weight * ce

    def gate(term):
        return term if energy_active is None else tf.cast(energy_active, tf.float32) * term

    e_sample = energy_gap = None
    energies_squared = tf.reduce_mean(tf.square(e_data - energy_l2_center))
    if px_weight > 0:
        e_sample = energy_lib.energy(logits_sample)
        # -log p(x) contrastive term: push data energy down, sample energy up.
        energy_gap = tf.reduce_mean(e_data) - tf.reduce_mean(e_sample)
        loss += gate(px_weight * energy_gap)
        if energy_l2_samples:
            energies_squared += tf.reduce_mean(tf.square(e_sample - energy_l2_center))
    if pxy_weight > 0:
        # -log p(x|y) contrastive term on the joint energy E(x, y) = -f(x)[y].
        e_cond_data = energy_lib.conditional_energy(logits_data, labels)
        e_cond_sample = energy_lib.conditional_energy(logits_conditional_sample, labels)
        if sample_weight is not None:
            total = tf.maximum(tf.reduce_sum(sample_weight), 1e-12)
            conditional_gap = tf.reduce_sum((e_cond_data - e_cond_sample) * sample_weight) / total
        else:
            conditional_gap = tf.reduce_mean(e_cond_data) - tf.reduce_mean(e_cond_sample)
        loss += gate(pxy_weight * conditional_gap)
    if energy_l2_weight > 0:
        loss += gate(energy_l2_weight * energies_squared)
    return ObjectiveTerms(loss=loss, ce=ce, e_data=e_data, e_sample=e_sample, energy_gap=energy_gap)
