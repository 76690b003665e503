"""The evaluation's settings: :class:`EvaluationConfig` and the defaults it and ``python -m jem_tf.evaluate`` share.
Plain Python (no TensorFlow), so that the command parses its flags, and prints ``--help``, before TensorFlow loads."""

from __future__ import annotations

import dataclasses
from typing import List, Mapping, Optional, Sequence

from jem_tf.choices import EVALUATION_MODES as MODES
from jem_tf.choices import REFINEMENT_SOURCES

DEFAULT_MODES = ("accuracy", "calibration", "ood", "samples")
# The OOD sets made from the test images themselves (jem_tf.evaluation.ood_benchmark).
SYNTHETIC_OOD = ("uniform", "constant", "permuted")
# Mode robustness: PGD budgets (fractions of the pixel range) and noise draws per BPDA step.
DEFAULT_PGD_EPS = {"linf": (0.03, 0.1), "l2": (0.5, 1.0)}
DEFAULT_EOT_SAMPLES = 4
# Mode frechet: the name of the Inception-v3 feature network (jem_tf.evaluation.frechet).
INCEPTION = "inception_v3"


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Every setting of :func:`evaluate`; the defaults are those of ``python -m jem_tf.evaluate``.

    Attributes:
        modes: Some of ``MODES`` (run in the order of ``MODES``).
        seed: Seed of every random choice of the evaluation.
        input_noise_std: Gaussian noise std added to every evaluated input (0: inputs as given).
        num_bins: Calibration bins (mode ``calibration``).
        temperature_scaling: Fit a temperature on the validation data (mode ``calibration``).
        refinement: Which refinement settings modes ``accuracy`` and ``robustness`` use (see
            :func:`jem_tf.evaluation.refinement_choice.resolve_refinement`): ``"model"`` (the model's saved
            settings, else chosen on the validation split), ``"choose"`` (chosen anew on the validation split) or
            ``"sampler"`` (the training sampler's settings, the old behaviour).
        refine_steps: Numbers of SGLD refinement steps before classifying (mode ``accuracy``); ``None``: the
            refinement settings' number.
        sample_steps: SGLD steps of fresh chains (modes ``samples`` and ``frechet``).
        num_samples: Images per sample grid (mode ``samples``).
        long_chain_steps: Steps of the long chain (mode ``samples``; 0: none).
        frechet_images: Test images, and samples per set, of the Fréchet distance (mode ``frechet``).
        pgd_eps: ``{norm: budgets}`` in fractions of the pixel range (mode ``robustness``); ``None`` or empty:
            ``DEFAULT_PGD_EPS``.
        pgd_steps: Steps of each PGD attack (mode ``robustness``).
        robustness_examples: Test images attacked (mode ``robustness``).
        robustness_refine_steps: SGLD refinement steps of attacked images before classifying (mode
            ``robustness``); ``None``: the refinement settings' number.
        bpda_eot_samples: Noise draws averaged per step of the adaptive (BPDA) attack when the refinement
            is random (mode ``robustness``).
        detectors: Names of the candidate detectors mode ``ood`` reports and selects among
            (:func:`jem_tf.ood.named_candidates`, e.g. ``("log_px",)``: a recipe's density alone, without the
            other candidates' cost); ``None``: all of them.
        batch_size: Batch size of the forward and backward passes.
    """

    modes: Sequence[str] = DEFAULT_MODES
    seed: int = 0
    input_noise_std: float = 0.0
    num_bins: int = 20
    temperature_scaling: bool = True
    refinement: str = "model"
    refine_steps: Optional[Sequence[int]] = None
    sample_steps: int = 200
    num_samples: int = 64
    long_chain_steps: int = 1000
    frechet_images: int = 1000
    pgd_eps: Optional[Mapping[str, Sequence[float]]] = None
    pgd_steps: int = 20
    robustness_examples: int = 500
    robustness_refine_steps: Optional[int] = None
    bpda_eot_samples: int = DEFAULT_EOT_SAMPLES
    detectors: Optional[Sequence[str]] = None
    batch_size: int = 256

    @classmethod
    def field_names(cls) -> List[str]:
        return [field.name for field in dataclasses.fields(cls)]

    def replace(self, **settings) -> "EvaluationConfig":
        """A copy with ``settings`` applied (unknown names raise ``ValueError``)."""
        unknown = sorted(set(settings) - set(self.field_names()))
        if unknown:
            raise ValueError(f"Unknown evaluation setting(s) {unknown}; known settings: "
                             f"{', '.join(self.field_names())}")
        return dataclasses.replace(self, **settings)

    def validate(self) -> "EvaluationConfig":
        """Raises ``ValueError`` naming the first bad setting; returns ``self``. (The modes check their own
        settings when they run.)"""
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"`modes` must be a non-empty subset of {MODES}; received {list(self.modes)}")
        if self.refinement not in REFINEMENT_SOURCES:
            raise ValueError(f"`refinement` must be one of {REFINEMENT_SOURCES}; received {self.refinement!r}")
        if not self.input_noise_std >= 0:
            raise ValueError(f"`input_noise_std` must be >= 0; received {self.input_noise_std!r}")
        return self
