"""Test-time refinement settings (the paper's robustness defence): a few SGLD steps down the energy before
classifying, with settings saved with the model.

Refinement runs ``x <- clip(x - step_size * clamp(dE/dx, +-grad_clamp) + noise_std * N(0, I), value_range)``
``n_steps`` times. The training sampler's settings (e.g. step 1.0 with a per-pixel clamp of 1: one step may
move a pixel by half its range) are made for short negative chains, not for refining data: they can
destroy clean accuracy. :func:`jem_tf.evaluation.refinement_choice.choose_refinement` picks settings on held-out
*validation* images by one documented rule, and the chosen :class:`RefinementSettings` are saved with the model
(``JEM(refinement=...)``), which :meth:`jem_tf.JEM.refine`, ``python -m jem_tf.evaluate`` and the robustness
mode use by default. (The choice attacks the model with PGD: it lives with the evaluation, above the model.)
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np

from jem_tf.sampling.sgld import SGLDSampler


@keras.saving.register_keras_serializable(package="jem_tf")
class RefinementSettings:
    """How a model refines its inputs: ``n_steps`` SGLD steps of ``step_size`` on the energy, with
    per-pixel gradient clamp ``grad_clamp`` and noise ``noise_std``, images clipped to the value range.

    Args:
        n_steps: SGLD steps (0: no refinement, the identity). Default 10.
        step_size: Coefficient on the (clamped) energy gradient. Default 0.01.
        noise_std: Std of the Gaussian noise added at every step. Default 0.
        grad_clamp: Per-pixel clamp of the gradient (``None``: none); with it and no noise, no pixel moves by
            more than ``step_size * grad_clamp`` per step. Default 1.0.
        source: Where the settings come from (a free-text record kept in reports), e.g. the rule and the
            validation split they were chosen on. Default ``"manual"``.

    Example:
        >>> settings = RefinementSettings(n_steps=10, step_size=0.01)
        >>> model.refinement = settings       # saved with the model
        >>> refined = model.refine(images)    # uses them
    """

    def __init__(self, n_steps: int = 10, step_size: float = 0.01, noise_std: float = 0.0,
                 grad_clamp: Optional[float] = 1.0, source: str = "manual"):
        if not (isinstance(n_steps, (int, np.integer)) and not isinstance(n_steps, bool) and n_steps >= 0):
            raise ValueError(f"`n_steps` must be an int >= 0; received n_steps={n_steps!r}")
        if not (isinstance(step_size, (int, float)) and np.isfinite(step_size) and step_size > 0):
            raise ValueError(f"`step_size` must be a finite number > 0; received step_size={step_size!r}")
        if not (isinstance(noise_std, (int, float)) and np.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"`noise_std` must be a finite number >= 0; received noise_std={noise_std!r}")
        if grad_clamp is not None and not (isinstance(grad_clamp, (int, float)) and grad_clamp > 0):
            raise ValueError(f"`grad_clamp` must be None or > 0; received grad_clamp={grad_clamp!r}")
        self.n_steps = int(n_steps)
        self.step_size = float(step_size)
        self.noise_std = float(noise_std)
        self.grad_clamp = None if grad_clamp is None else float(grad_clamp)
        self.source = str(source)
        self._samplers = {}

    @classmethod
    def from_sampler(cls, sampler: SGLDSampler, *, n_steps: int = 10, source: str = "the training sampler"
                     ) -> "RefinementSettings":
        """The training sampler's step size, noise and gradient clamp (the behaviour before settings were chosen)."""
        return cls(n_steps=n_steps, step_size=sampler.step_size, noise_std=sampler.noise_std,
                   grad_clamp=sampler.grad_clamp, source=source)

    @property
    def is_random(self) -> bool:
        """Whether refining draws noise (then an adaptive attack takes an expectation over it)."""
        return self.n_steps > 0 and self.noise_std > 0

    def replace(self, **changes) -> "RefinementSettings":
        """A copy with ``changes`` (``n_steps``, ``step_size``, ``noise_std``, ``grad_clamp``, ``source``);
        ``None`` values are ignored, except for ``grad_clamp``."""
        config = self.get_config()
        for name, value in changes.items():
            if name not in config:
                raise ValueError(f"Unknown refinement setting {name!r}; known: {', '.join(config)}")
            if value is not None or name == "grad_clamp":
                config[name] = value
        return RefinementSettings(**config)

    def sampler(self, value_range: Sequence[float]) -> SGLDSampler:
        """The :class:`SGLDSampler` that runs these settings on images in ``value_range`` (built once)."""
        key = tuple(float(v) for v in value_range)
        if key not in self._samplers:
            self._samplers[key] = SGLDSampler(step_size=self.step_size, noise_std=self.noise_std,
                                              n_steps=max(1, self.n_steps), grad_clamp=self.grad_clamp,
                                              clamp_range=key)
        return self._samplers[key]

    def describe(self) -> dict:
        """The settings as a JSON-ready dict for reports."""
        return self.get_config()

    def get_config(self) -> dict:
        return {"n_steps": self.n_steps, "step_size": self.step_size, "noise_std": self.noise_std,
                "grad_clamp": self.grad_clamp, "source": self.source}

    @classmethod
    def from_config(cls, config: dict) -> "RefinementSettings":
        return cls(**config)

    def __eq__(self, other) -> bool:
        return isinstance(other, RefinementSettings) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(self.get_config().items()))

    def __repr__(self) -> str:
        return "RefinementSettings(" + ", ".join(f"{k}={v!r}" for k, v in self.get_config().items()) + ")"
