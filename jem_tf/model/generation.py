"""Drawing images from a JEM: the energy SGLD descends, where fresh chains start, and the compiled SGLD
behind :meth:`jem_tf.JEM.sample` and :meth:`jem_tf.JEM.refine`.

One home for what the model and its export share: :func:`sgld_energy` is the target of the training
chains, of :meth:`~jem_tf.JEM.sample` and of :meth:`~jem_tf.JEM.refine`; :func:`sgld_energy_per_row` is the
exported ``sample`` signature's (:mod:`jem_tf.serving`); both start where training chains start
(:meth:`jem_tf.sampling.replay_buffer.ReplayBuffer.fresh_chains`), and with the same seed salt, so
``JEM.sample(seed=s)`` and a served ``sample`` request with seed ``s`` draw the same images from a float32 model.
:class:`Generator` is what a model's ``sample`` and ``refine`` delegate to.

The module sees a model only through its attributes (``logits``, ``sampler``, ``replay_buffer``,
``chain_init``, ``class_conditional_buffer``, ``refinement_settings``, ``image_shape``, ``num_classes``,
``value_range``), so :mod:`jem_tf.model.jem` can import it.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from jem_tf import seeds
from jem_tf.model import energy as energy_lib
from jem_tf.model.refinement import RefinementSettings
from jem_tf.sampling.chain_init import start_chains
from jem_tf.sampling.sgld import SGLDSampler
from jem_tf.seeds import as_stateless_seed

# Where JEM.sample starts its chains (see Generator.sample).
INITS = ("default", "uniform", "class_gaussian", "buffer")


def sgld_energy(logits_fn: Callable[[tf.Tensor], tf.Tensor]) -> Callable:
    """The energy SGLD descends, ``energy(x, labels=None) -> [batch]``, of a network's float32 logits
    ``logits_fn(x)`` (called in inference mode by the caller: no dropout, no batch-norm statistic updates).

    Without labels ``E(x) = -logsumexp_y f(x)[y]`` (samples of ``p(x)``); with int ``labels [batch]`` the
    joint energy ``E(x, y) = -f(x)[y]`` (samples of ``p(x|y)``).

    Example:
        >>> energy_fn = sgld_energy(lambda x: model.logits(x, training=False))
        >>> samples, _ = model.sampler.sample(energy_fn, x0, seed=0)
    """

    def energy(x, labels=None):
        logits = logits_fn(x)
        if labels is None:
            return energy_lib.energy(logits)
        return energy_lib.conditional_energy(logits, labels)

    return energy


def sgld_energy_per_row(logits_fn: Callable[[tf.Tensor], tf.Tensor]) -> Callable:
    """:func:`sgld_energy` chosen per row, ``energy(x, labels) -> [batch]``: a row of label -1 gets ``E(x)``,
    the others ``E(x, y)``. One graph for both, for callers whose labels are runtime values (the exported
    ``sample`` signature's ``class_label``)."""

    def energy(x, labels):
        logits = logits_fn(x)
        conditional = energy_lib.conditional_energy(logits, tf.maximum(labels, 0))
        return tf.where(labels >= 0, conditional, energy_lib.energy(logits))

    return energy


def refinement_fn(model, settings: RefinementSettings) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``fn(x, seed) -> refined x``, a TensorFlow function of a batch (usable inside ``tf.function``, e.g. an
    attack's graph) that equals ``model.refine(x, seed=seed, settings=settings)``: unconditional SGLD on
    ``E(x) = -logsumexp_y f(x)[y]`` (:func:`sgld_energy`). The result carries no gradient."""
    if settings.n_steps == 0:
        return lambda x, seed: x
    sampler = settings.sampler(model.value_range)
    energy_fn = sgld_energy(lambda x: model.logits(x, training=False))

    def fn(x, seed):
        return sampler.sample(energy_fn, x, seeds.fold(as_stateless_seed(seed), seeds.SAMPLE_SGLD),
                              n_steps=settings.n_steps)[0]

    return fn


def _check_n_steps(n_steps) -> None:
    if n_steps is not None and not (isinstance(n_steps, int) and n_steps >= 0):
        raise ValueError(f"`n_steps` must be an int >= 0; received {n_steps!r}")


class Generator:
    """Draws (:meth:`sample`) and refines (:meth:`refine`) images with a model's SGLD: what
    :meth:`jem_tf.JEM.sample` and :meth:`jem_tf.JEM.refine` delegate to. The compiled SGLD function is built
    once per sampler structure and reused; results come back as numpy arrays.

    Args:
        model: A :class:`jem_tf.JEM` (read through the attributes named in the module docstring, at every
            call: a changed ``refinement`` or ``sampler`` is used).

    Example:
        >>> generator = Generator(model)
        >>> x = generator.sample(16, seed=0, n_steps=50)
    """

    def __init__(self, model):
        self.model = model
        # The sampler sees the network in inference mode (no dropout, no BN statistic updates).
        self.energy = sgld_energy(lambda x: model.logits(x, training=False))
        self._sgld_functions = {}

    def sample(self, num_samples: int, *, seed=0, n_steps: Optional[int] = None, labels=None,
               init: str = "default", step_size: Optional[float] = None,
               noise_std: Optional[float] = None) -> np.ndarray:
        """:meth:`jem_tf.JEM.sample` (see there): SGLD from the start ``init`` with the training sampler."""
        model = self.model
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"`num_samples` must be an int >= 1; received {num_samples!r}")
        if init not in INITS:
            raise ValueError(f"`init` must be one of {INITS}; received {init!r}")
        if init == "class_gaussian" and model.chain_init is None:
            raise ValueError("`init='class_gaussian'` needs a model built with a fitted `chain_init`.")
        _check_n_steps(n_steps)
        context = self._labels_context(labels, num_samples)
        seed = as_stateless_seed(seed)
        if init == "buffer":
            # Stored chains (from the labels' class slots when the buffer has them), without restarts.
            draw_labels = context[0] if context and model.class_conditional_buffer else None
            indices = model.replay_buffer.draw(num_samples, seed, labels=draw_labels).indices
            x = model.replay_buffer.read(indices)
        elif init == "default":  # the training chains' start
            x = model.replay_buffer.fresh_chains(num_samples, seed, labels=context[0] if context else None)
        else:  # one part of it
            x = start_chains(num_samples, seed, image_shape=model.image_shape, value_range=model.value_range,
                             init=model.chain_init if init == "class_gaussian" else None,
                             labels=context[0] if context else None)
        return self._run_sgld(model.sampler, x, seed, n_steps, step_size, noise_std, context)

    def refine(self, images, *, n_steps: Optional[int] = None, seed=0, labels=None,
               step_size: Optional[float] = None, noise_std: Optional[float] = None, settings=None) -> np.ndarray:
        """:meth:`jem_tf.JEM.refine` (see there): SGLD from ``images`` with the refinement ``settings``."""
        model = self.model
        images = np.asarray(images, dtype=np.float32)
        if images.shape[1:] != tuple(model.image_shape) or images.shape[0] < 1:
            raise ValueError(f"`images` must be [N >= 1, {', '.join(map(str, model.image_shape))}]; "
                             f"received shape {images.shape}")
        _check_n_steps(n_steps)
        if settings == "sampler":
            sampler = model.sampler
        else:
            if settings is None:
                settings = model.refinement_settings
            if not isinstance(settings, RefinementSettings):
                raise ValueError(f"`settings` must be None, 'sampler' or RefinementSettings; received {settings!r}")
            sampler = settings.sampler(model.value_range)
            n_steps = settings.n_steps if n_steps is None else n_steps
        context = self._labels_context(labels, images.shape[0])
        return self._run_sgld(sampler, tf.constant(images), as_stateless_seed(seed), n_steps, step_size, noise_std,
                              context)

    def _labels_context(self, labels, num: int) -> tuple:
        """``()`` without labels, else ``(int32 labels,)`` after checking ``num`` ids in range."""
        if labels is None:
            return ()
        num_classes = self.model.num_classes
        labels = np.asarray(labels)
        if labels.shape != (num,) or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"`labels` must be {num} class ids in [0, {num_classes}); received {labels!r}")
        return (tf.constant(labels, tf.int32),)

    def _run_sgld(self, sampler: SGLDSampler, x, seed, n_steps, step_size, noise_std, context) -> np.ndarray:
        """SGLD from ``x`` with ``sampler``, its settings overridden by those given, through one compiled
        function per sampler structure (step size, noise and steps are arguments: changing them does not
        retrace)."""
        if n_steps == 0:
            return x.numpy()
        # Workaround (TF 2.21): one tf.function per arity too. A single *context varargs function called with
        # and without labels breaks tf.function's retracing relaxation (reduce_retracing) with an IndexError.
        structure = {k: v for k, v in sampler.get_config().items() if k not in ("step_size", "noise_std", "n_steps")}
        key = (len(context), repr(sorted(structure.items())))
        sample_fn = self._sgld_functions.get(key)
        if sample_fn is None:
            sample_fn = self._sgld_functions[key] = tf.function(
                lambda x, seed, n_steps, step_size, noise_std, *context: sampler.sample(
                    self.energy, x, seed, context=context, n_steps=n_steps,
                    step_size=step_size, noise_std=noise_std)[0],
                reduce_retracing=True,
            )
        sgld_seed = seeds.fold(seed, seeds.SAMPLE_SGLD)
        n_steps = sampler.n_steps if n_steps is None else n_steps
        step_size = sampler.step_size if step_size is None else step_size
        noise_std = sampler.noise_std if noise_std is None else noise_std
        return sample_fn(x, sgld_seed, tf.constant(n_steps, tf.int32), tf.constant(step_size, tf.float32),
                         tf.constant(noise_std, tf.float32), *context).numpy()
