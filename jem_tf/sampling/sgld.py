"""Stochastic-gradient Langevin dynamics (SGLD) on an energy function.

One step moves every chain downhill on the energy and adds Gaussian noise::

    x <- x - step_size * dE/dx + noise_std * N(0, I)        (then optionally clamp x)

With ``step_size = eps / 2`` and ``noise_std = sqrt(eps)`` this is textbook (unadjusted)
Langevin dynamics, whose samples follow ``exp(-E(x))`` as ``eps -> 0``. JEM decouples the two
(step size 1.0, noise std 0.01): biased but fast, as in the paper's reference code.

The sampler never sees a model, only an energy callable ``energy_fn(x, *context) -> [batch]``.
"""

from __future__ import annotations

import collections
from typing import Callable, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from jem_tf.sampling.distribution import BatchPosition, replica_random
from jem_tf.seeds import as_stateless_seed

SGLDDiagnostics = collections.namedtuple(
    "SGLDDiagnostics",
    [
        "initial_energy",  # [batch] energy of the starting points.
        "last_step_energy",  # [batch] energy at the input of the last step (no extra forward).
        "energy_trace",  # [n_steps] mean energy at the start of every step.
        "grad_norm_trace",  # [n_steps] mean per-chain L2 norm of dE/dx at every step.
    ],
)
SGLDDiagnostics.__doc__ = """Diagnostics of one SGLD run; tensors, never prints."""


@keras.saving.register_keras_serializable(package="jem_tf")
class SGLDSampler:
    """SGLD sampler for an energy-based model.

    Args:
        step_size: Coefficient on the energy gradient, ``x -= step_size * dE/dx``. Default 1.0.
        noise_std: Standard deviation of the Gaussian noise added at each step. Default 0.01.
        n_steps: Number of SGLD steps. Default 20.
        grad_clip: If set, clip each chain's gradient to this L2 norm. Default ``None``.
        grad_clamp: If set, clamp every element of the gradient to ``[-grad_clamp, grad_clamp]`` (JEM++'s
            proximal step: without noise no pixel moves by more than ``step_size * grad_clamp`` per step,
            however steep the energy). Default ``None``.
        clamp_range: If set, a ``(low, high)`` pair: clamp ``x`` to it after every step
            (the proximal variant of JEM++). Default ``None``.
        jit_compile: Compile the sampling loop alone with XLA. Default ``False``: on CPU
            XLA made the JEM step slower. XLA's random kernels differ from TensorFlow's, so a
            compiled sampler draws different (equally valid) noise for a seed; each is
            deterministic per seed.

    Example:
        >>> sampler = SGLDSampler(step_size=0.005, noise_std=0.1, n_steps=100)
        >>> energy_fn = lambda x: 0.5 * tf.reduce_sum(x**2, axis=-1)
        >>> samples, diag = sampler.sample(energy_fn, tf.ones([512, 2]), seed=0)

    Reference:
        Welling & Teh, "Bayesian Learning via Stochastic Gradient Langevin Dynamics", 2011;
        Grathwohl et al., ICLR 2020 (JEM) and Yang & Ji, 2021 (JEM++).
    """

    def __init__(
        self,
        step_size: float = 1.0,
        noise_std: float = 0.01,
        n_steps: int = 20,
        grad_clip: Optional[float] = None,
        clamp_range: Optional[Sequence[float]] = None,
        jit_compile: bool = False,
        grad_clamp: Optional[float] = None,
    ):
        if not step_size > 0:
            raise ValueError(f"`step_size` must be > 0; received step_size={step_size!r}")
        if not noise_std >= 0:
            raise ValueError(f"`noise_std` must be >= 0; received noise_std={noise_std!r}")
        if not (isinstance(n_steps, int) and n_steps >= 1):
            raise ValueError(f"`n_steps` must be an int >= 1; received n_steps={n_steps!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"`grad_clip` must be None or > 0; received grad_clip={grad_clip!r}")
        if grad_clamp is not None and not grad_clamp > 0:
            raise ValueError(f"`grad_clamp` must be None or > 0; received grad_clamp={grad_clamp!r}")
        if clamp_range is not None:
            clamp_range = tuple(float(v) for v in clamp_range)
            if len(clamp_range) != 2 or not clamp_range[0] < clamp_range[1]:
                raise ValueError(
                    f"`clamp_range` must be a (low, high) pair with low < high; "
                    f"received clamp_range={clamp_range!r}"
                )
        self.step_size = float(step_size)
        self.noise_std = float(noise_std)
        self.n_steps = int(n_steps)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.grad_clamp = None if grad_clamp is None else float(grad_clamp)
        self.clamp_range = clamp_range
        self.jit_compile = bool(jit_compile)
        self._compiled_loop = None

    def step(self, energy_fn: Callable, x: tf.Tensor, seed: tf.Tensor, context=(), step_size=None,
             noise_std=None, position: Optional[BatchPosition] = None) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """One SGLD step. Returns ``(new_x, energy_at_x [batch], grad_norm [batch])``.

        ``position`` (``(offset, global_batch)``) makes the noise that of rows ``offset..`` of a
        global batch (see :mod:`jem_tf.sampling.distribution`).
        """
        step_size = self.step_size if step_size is None else step_size
        noise_std = self.noise_std if noise_std is None else noise_std
        with tf.GradientTape() as tape:
            tape.watch(x)
            energies = energy_fn(x, *context)
            # Chains are independent, so d(sum_i E(x_i))/dx_i = dE(x_i)/dx_i.
            total_energy = tf.reduce_sum(energies)
        grad = tape.gradient(total_energy, x)
        reduce_axes = list(range(1, len(x.shape)))
        grad_norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=reduce_axes))
        if self.grad_clip is not None:
            # Per-chain L2 clipping: grad * min(1, clip / ||grad||).
            scale = tf.minimum(1.0, self.grad_clip / tf.maximum(grad_norm, 1e-12))
            grad = grad * tf.reshape(scale, [-1] + [1] * len(reduce_axes))
        if self.grad_clamp is not None:
            grad = tf.clip_by_value(grad, -self.grad_clamp, self.grad_clamp)
        noise = replica_random(tf.random.stateless_normal, tf.shape(x), position, seed=seed, dtype=x.dtype,
                               alg="philox")
        new_x = x - tf.cast(step_size, x.dtype) * grad + tf.cast(noise_std, x.dtype) * noise
        if self.clamp_range is not None:
            new_x = tf.clip_by_value(new_x, self.clamp_range[0], self.clamp_range[1])
        return new_x, energies, grad_norm

    def _loop(self, energy_fn, x_init, seed, context, n_steps, step_size, noise_std, position):
        batch_shape = tf.shape(x_init)[:1]
        trace_energy = tf.TensorArray(tf.float32, size=n_steps)
        trace_grad = tf.TensorArray(tf.float32, size=n_steps)

        def body(i, x, first_energy, last_energy, trace_energy, trace_grad):
            step_seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(i, tf.int64))
            x, energies, grad_norm = self.step(
                energy_fn, x, step_seed, context, step_size=step_size, noise_std=noise_std, position=position
            )
            energies = tf.cast(energies, tf.float32)
            first_energy = tf.where(i == 0, energies, first_energy)
            trace_energy = trace_energy.write(i, tf.reduce_mean(energies))
            trace_grad = trace_grad.write(i, tf.reduce_mean(tf.cast(grad_norm, tf.float32)))
            return i + 1, x, first_energy, energies, trace_energy, trace_grad

        zeros = tf.zeros(batch_shape, tf.float32)
        _, x, first_energy, last_energy, trace_energy, trace_grad = tf.while_loop(
            lambda i, *_: i < n_steps,
            body,
            (tf.constant(0, tf.int32), x_init, zeros, zeros, trace_energy, trace_grad),
            shape_invariants=(
                tf.TensorShape([]),
                x_init.shape,
                tf.TensorShape([None]),
                tf.TensorShape([None]),
                tf.TensorShape(None),
                tf.TensorShape(None),
            ),
        )
        return tf.stop_gradient(x), SGLDDiagnostics(
            initial_energy=first_energy,
            last_step_energy=last_energy,
            energy_trace=trace_energy.stack(),
            grad_norm_trace=trace_grad.stack(),
        )

    def sample(self, energy_fn: Callable, x_init: tf.Tensor, seed, context=(), n_steps=None,
               step_size=None, noise_std=None,
               position: Optional[BatchPosition] = None) -> Tuple[tf.Tensor, SGLDDiagnostics]:
        """Runs ``n_steps`` of SGLD from ``x_init``.

        Args:
            energy_fn: ``energy_fn(x, *context) -> [batch]`` energies; must be differentiable in x.
            x_init: Starting points, ``[batch, ...]`` floating point.
            seed: Int or shape-[2] integer tensor; the same seed gives the same samples.
            context: Extra tensors passed to ``energy_fn`` (e.g. class labels for ``p(x|y)``).
            n_steps, step_size, noise_std: Optional per-call overrides (Python numbers or
                scalar tensors, e.g. from a serving signature).
            position: Optional ``(offset, global_batch_size)``: draw the noise of the global batch
                and use this replica's rows, so that data-parallel sampling equals single-device
                sampling (see :mod:`jem_tf.sampling.distribution`).

        Returns:
            ``(samples, SGLDDiagnostics)``; samples carry no gradient.
        """
        x_init = tf.convert_to_tensor(x_init)
        if not x_init.dtype.is_floating:
            raise ValueError(f"`x_init` must be floating point; received dtype {x_init.dtype.name}")
        seed = as_stateless_seed(seed)
        n_steps = self.n_steps if n_steps is None else n_steps
        step_size = self.step_size if step_size is None else step_size
        noise_std = self.noise_std if noise_std is None else noise_std
        args = (x_init, seed, tuple(context), tf.cast(n_steps, tf.int32),
                tf.cast(step_size, tf.float32), tf.cast(noise_std, tf.float32), position)
        if not self.jit_compile:
            return self._loop(energy_fn, *args)
        if self._compiled_loop is None:
            # Built once; XLA compiles one program per energy function and input signature.
            self._compiled_loop = tf.function(self._loop, jit_compile=True, reduce_retracing=True)
        return self._compiled_loop(energy_fn, *args)

    def get_config(self) -> dict:
        return {
            "step_size": self.step_size,
            "noise_std": self.noise_std,
            "n_steps": self.n_steps,
            "grad_clip": self.grad_clip,
            "clamp_range": None if self.clamp_range is None else list(self.clamp_range),
            "jit_compile": self.jit_compile,
            "grad_clamp": self.grad_clamp,
        }

    @classmethod
    def from_config(cls, config: dict) -> "SGLDSampler":
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"SGLDSampler({args})"
