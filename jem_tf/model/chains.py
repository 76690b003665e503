"""The sampling half of a JEM training step: the noisy data, the SGLD chains of the contrastive terms, and
the forward pass that keeps batch-norm statistics away from the chains.

One step of :meth:`jem_tf.JEM.train_step`:

* the data: ``x_data = x + data_noise_std * N(0, I)`` (the paper's data noise);
* the ``p(x)`` chains (with ``px_weight``): drawn from the replay buffer (restarts from the start
  distribution), run through SGLD on ``E(x)``, written back. In a semi-supervised batch (rows of weight 0 next
  to labelled rows) there is one chain per unlabelled row: the labelled rows feed the cross-entropy and are
  already among the unlabelled images of an epoch, so chains for them would only add cost;
* the ``p(x|y)`` chains (with ``pxy_weight``): one per row, from the slots of the row's class, run on
  ``E(x, y)``; an unlabelled row carries a placeholder label, so its chain is drawn from the slots of class
  ``row mod K`` instead, weighs 0 in the loss and is never written back;
* before ``energy_start_step`` the chains are drawn and written back but take no SGLD step.

Every random number comes from :meth:`TrainingChains.step_seed`: (model seed, reseed count, optimizer step,
stream), so a step is reproducible and resumable, and under a strategy the numbers are drawn for the global
batch (see :mod:`jem_tf.sampling.distribution`).

The SGLD samples are constants of the loss; the sampler sees the network in inference mode. Batch-norm
statistics must never see them, so with batch norm the data and the chains take separate forward passes;
without it one concatenated pass is cheaper (:meth:`TrainingChains.forward`).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import keras
import tensorflow as tf

from jem_tf import keras_workarounds, seeds
from jem_tf.model import generation
from jem_tf.sampling.distribution import global_batch_position, replica_random


class ContrastiveBatch(NamedTuple):
    """What :meth:`TrainingChains.sample` gives the loss: the images of one step, by role."""

    data: tf.Tensor  # the (noised) data
    sample: Optional[tf.Tensor] = None  # the p(x) chains (with px_weight)
    conditional_sample: Optional[tf.Tensor] = None  # the p(x|y) chains (with pxy_weight), row i drawn for label i
    grad_norms: Tuple[tf.Tensor, ...] = ()  # the SGLD gradient-norm trace of each group of chains

    @property
    def chains(self) -> List[tf.Tensor]:
        """The SGLD chains of the step (p(x), then p(x|y)), those that ran."""
        return [t for t in (self.sample, self.conditional_sample) if t is not None]


class ContrastiveLogits(NamedTuple):
    """float32 logits of a :class:`ContrastiveBatch`, by the same roles (:meth:`TrainingChains.forward`)."""

    data: tf.Tensor
    sample: Optional[tf.Tensor] = None
    conditional_sample: Optional[tf.Tensor] = None


class TrainingChains:
    """The training step's samples (:meth:`sample`) and its forward pass (:meth:`forward`), for
    :meth:`jem_tf.JEM.train_step` (see the module docstring).

    Holds no variables (only the model, its SGLD energy and whether its backbone has batch norm): it reads the
    model at every call (``seed``, ``seed_state``, ``optimizer``, ``replay_buffer``, ``sampler``, the loss
    weights, ``energy_start_step``, ``num_classes``), so the replay buffer and the reseed counter stay the
    model's tracked, saved and mirrored variables.

    Args:
        model: A :class:`jem_tf.JEM`.

    Example:
        >>> batch = TrainingChains(model).sample(x, y, sample_weight=None)
    """

    def __init__(self, model):
        self.model = model
        # The energy SGLD descends, of the network in inference mode (no dropout, no BN statistic updates).
        self.energy = generation.sgld_energy(lambda x: model.logits(x, training=False))
        # Batch norm in training mode (frozen layers run in inference mode and see no batch statistics).
        self.has_batch_norm = any(
            isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
            for layer in keras_workarounds.all_layers(model.backbone))

    def step_seed(self, salt: int) -> tf.Tensor:
        """The training stream ``salt`` at the current optimizer step (:func:`jem_tf.seeds.step_seed`):
        reproducible and resumable, the same on every replica."""
        model = self.model
        return seeds.step_seed(model.seed, model.seed_state.reseeds.value, model.optimizer.iterations, salt)

    def energy_active(self) -> Optional[tf.Tensor]:
        """``None`` when the energy terms are on from the first step, else a boolean tensor: whether the
        optimizer step has reached ``energy_start_step``."""
        if self.model.energy_start_step == 0:
            return None
        return self.model.optimizer.iterations >= self.model.energy_start_step

    def sample(self, x, y, sample_weight=None) -> ContrastiveBatch:
        """The noisy data and the chains of one step, for float32 images ``x``, int32 labels ``y`` and float32
        ``sample_weight`` (``[batch]``, or ``None``); the chains are written back to the replay buffer."""
        model = self.model
        batch_size = tf.shape(x)[0]
        # Where this replica's rows sit in the global batch: (0, batch_size) on one device.
        position = global_batch_position(batch_size)
        # x_data = x + sigma * N(0, I): the paper's data noise.
        if model.data_noise_std > 0:
            noise = replica_random(tf.random.stateless_normal, tf.shape(x), position,
                                   seed=self.step_seed(seeds.STEP_DATA_NOISE))
            x = x + model.data_noise_std * noise
        batch = ContrastiveBatch(data=x)
        if model.px_weight > 0:
            num_chains, chain_position = self._px_chain_count(batch_size, position, sample_weight)
            x_sample, diagnostics = self._run_chains(num_chains, chain_position, seeds.STEP_DRAW, seeds.STEP_SGLD)
            batch = batch._replace(sample=x_sample, grad_norms=batch.grad_norms + (diagnostics.grad_norm_trace,))
        if model.pxy_weight > 0:
            labelled = None if sample_weight is None else sample_weight > 0
            labels = y if labelled is None else tf.where(
                labelled, y, tf.math.floormod(tf.range(batch_size, dtype=y.dtype) + tf.cast(position[0], y.dtype),
                                             model.num_classes))
            x_cond, diagnostics = self._run_chains(batch_size, position, seeds.STEP_DRAW_CONDITIONAL,
                                                   seeds.STEP_SGLD_CONDITIONAL, labels=labels, labelled=labelled)
            batch = batch._replace(conditional_sample=x_cond,
                                   grad_norms=batch.grad_norms + (diagnostics.grad_norm_trace,))
        return batch

    def forward(self, batch: ContrastiveBatch) -> ContrastiveLogits:
        """float32 logits of each image of ``batch``, by role: the data in training mode, the chains in inference
        mode when the backbone has batch norm; else all in one training-mode pass."""
        logits_fn = self.model.logits
        roles = [name for name in ("sample", "conditional_sample") if getattr(batch, name) is not None]
        images = [batch.data] + [getattr(batch, name) for name in roles]
        if self.has_batch_norm:
            logits = [logits_fn(batch.data, training=True)] + [logits_fn(x, training=False) for x in images[1:]]
        else:
            logits = tf.split(logits_fn(tf.concat(images, axis=0), training=True),
                              [tf.shape(x)[0] for x in images], axis=0)
        return ContrastiveLogits(logits[0], **dict(zip(roles, logits[1:])))

    def _px_chain_count(self, batch_size, position, sample_weight):
        """``(count, position)`` of the p(x) chains: one per row, or one per unlabelled row of a semi-supervised
        batch (see the module docstring)."""
        if sample_weight is None or getattr(self.model, "jit_compile", False):
            return batch_size, position  # (XLA needs a static chain count.)
        unlabelled = tf.reduce_sum(tf.cast(tf.equal(sample_weight, 0.0), tf.int32))
        count = tf.where(unlabelled > 0, unlabelled, batch_size)
        return count, global_batch_position(count)

    def _run_chains(self, batch_size, position, draw_salt, sgld_salt, labels=None, labelled=None):
        """SGLD chains drawn from the replay buffer (of class ``labels[i]`` for row ``i`` when given) and written
        back; ``labelled`` (bool ``[batch]``): the rows whose chains are written back (the others are discarded)."""
        model = self.model
        draw = model.replay_buffer.draw(batch_size, self.step_seed(draw_salt), labels=labels, position=position)
        context = () if labels is None else (labels,)
        active = self.energy_active()
        # Before energy_start_step the chains take no SGLD step (the loop runs zero times).
        n_steps = None if active is None else tf.where(active, model.sampler.n_steps, 0)
        samples, diagnostics = model.sampler.sample(
            self.energy, draw.x, self.step_seed(sgld_salt), context=context, position=position,
            n_steps=n_steps,
        )
        model.replay_buffer.update(draw.indices, samples, keep=labelled)
        return samples, diagnostics
