"""The checks of :class:`jem_tf.JEM`'s constructor and ``compile`` arguments, each naming the bad value.

:func:`check_jem_arguments` checks what the model itself owns (the backbone, the loss weights, the sampler,
the value range, the seeds, the refinement settings) and fills in what the backbone tells (``image_shape``,
``num_classes``). What a component owns is checked by the component: the replay buffer checks its size,
restart probability, storage and chain initialisation, the sampler its settings.

A backbone that cannot be a JEM is refused: a Keras backend other than TensorFlow, an object that is not a
``keras.Model``, a softmax head (energies of probabilities are meaningless; :meth:`jem_tf.JEM.from_classifier`
takes the logits instead), and an input shape that is not static (the replay buffer holds images of one
size; ``image_shape=`` says it for a network that takes any size). :func:`check_compile_arguments` refuses a
``loss`` or ``metrics`` for ``compile``: the JEM objective is the loss and its metrics are fixed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import keras
import numpy as np

from jem_tf.data import inputs
from jem_tf.model.conversion import softmax_head
from jem_tf.model.refinement import RefinementSettings
from jem_tf.sampling.sgld import SGLDSampler


class JEMArguments(NamedTuple):
    """The checked arguments, with the defaults filled in."""

    sampler: SGLDSampler
    refinement: Optional[RefinementSettings]
    image_shape: Tuple[int, ...]
    num_classes: int
    class_conditional_buffer: bool
    value_range: Tuple[float, float]


def backbone_shapes(backbone, image_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None):
    """``(image_shape, num_classes)`` of a logits ``backbone``, those given as they are, the others read from the
    backbone; ``ValueError`` when the backbone cannot be a JEM's (see the module docstring)."""
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"jem-tf needs Keras's TensorFlow backend; this Keras uses {keras.backend.backend()!r} "
                         "(set KERAS_BACKEND=tensorflow before importing keras).")
    if not isinstance(backbone, keras.Model):
        raise ValueError(f"`backbone` must be a keras.Model returning logits; received {backbone!r}")
    head = softmax_head(backbone)
    if head is not None:
        raise ValueError(f"The backbone ends in a softmax ({head}): a JEM needs the logits f(x) (its energies "
                         "-logsumexp f(x) would be meaningless on probabilities). Remove the softmax "
                         "(activation=None on the last layer), or convert the classifier with "
                         "JEM.from_classifier, which takes its logits.")
    if image_shape is None:
        image_shape = inputs.static_shape_tuple(getattr(backbone, "input_shape", None) and backbone.input_shape[1:])
    if num_classes is None and getattr(backbone, "output_shape", None) is not None:
        num_classes = backbone.output_shape[-1]
    if image_shape is None or num_classes is None:
        declared = getattr(backbone, "input_shape", None) if backbone.built or hasattr(backbone, "inputs") else None
        raise ValueError(
            "Could not infer `image_shape`/`num_classes` from the backbone (its input shape "
            f"{declared!r} must be static: the replay buffer holds images of one size); build it with a "
            "fixed input shape or pass them explicitly "
            f"(received image_shape={image_shape!r}, num_classes={num_classes!r})."
        )
    return image_shape, num_classes


def check_jem_arguments(backbone, *, sampler=None, class_conditional_buffer: Optional[bool] = None,
                        pyx_weight: float, px_weight: float, pxy_weight: float, energy_l2_weight: float,
                        data_noise_std: float, value_range: Sequence[float], seed: int, energy_start_step: int,
                        energy_l2_center: float = 0.0, energy_l2_samples: bool = True, label_smoothing: float = 0.0,
                        image_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                        refinement=None) -> JEMArguments:
    """Checks :class:`jem_tf.JEM`'s own arguments (see there) in order, raising ``ValueError`` at the first bad
    one; returns them with the defaults filled in. ``sampler`` and ``refinement`` may be serialised dicts.

    Example:
        >>> args = check_jem_arguments(backbone, pyx_weight=1.0, px_weight=1.0, pxy_weight=0.0,
        ...                            energy_l2_weight=0.0, data_noise_std=0.03, value_range=(-1, 1), seed=0,
        ...                            energy_start_step=0)
        >>> args.num_classes
        10
    """
    image_shape, num_classes = backbone_shapes(backbone, image_shape, num_classes)
    for name, weight in [("pyx_weight", pyx_weight), ("px_weight", px_weight),
                         ("pxy_weight", pxy_weight), ("energy_l2_weight", energy_l2_weight),
                         ("data_noise_std", data_noise_std)]:
        if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight >= 0):
            raise ValueError(f"`{name}` must be a finite number >= 0; received {name}={weight!r}")
    if isinstance(energy_l2_center, bool) or not (isinstance(energy_l2_center, (int, float))
                                                  and np.isfinite(energy_l2_center)):
        raise ValueError(f"`energy_l2_center` must be a finite number; received energy_l2_center={energy_l2_center!r}")
    if isinstance(label_smoothing, bool) or not (isinstance(label_smoothing, (int, float))
                                                 and 0 <= label_smoothing < 1):
        raise ValueError(f"`label_smoothing` must be a number in [0, 1); received label_smoothing={label_smoothing!r}")
    if not isinstance(energy_l2_samples, bool):
        raise ValueError(f"`energy_l2_samples` must be True or False; received energy_l2_samples={energy_l2_samples!r}")
    if sampler is None:
        sampler = SGLDSampler()
    elif isinstance(sampler, dict):
        sampler = keras.saving.deserialize_keras_object(sampler)
    if not isinstance(sampler, SGLDSampler):
        raise ValueError(f"`sampler` must be an SGLDSampler; received {sampler!r}")
    value_range = inputs.check_value_range(value_range)
    if not isinstance(seed, int):
        raise ValueError(f"`seed` must be an int; received seed={seed!r}")
    if not (isinstance(energy_start_step, int) and energy_start_step >= 0):
        raise ValueError(f"`energy_start_step` must be an int >= 0; received {energy_start_step!r}")
    if class_conditional_buffer is None:
        class_conditional_buffer = pxy_weight > 0
    if pxy_weight > 0 and not class_conditional_buffer:
        raise ValueError("`pxy_weight` > 0 needs `class_conditional_buffer=True`.")
    if isinstance(refinement, dict):
        refinement = keras.saving.deserialize_keras_object(refinement)
    if refinement is not None and not isinstance(refinement, RefinementSettings):
        raise ValueError(f"`refinement` must be None or RefinementSettings; received {refinement!r}")
    return JEMArguments(sampler, refinement, tuple(int(d) for d in image_shape), int(num_classes),
                        bool(class_conditional_buffer), value_range)


def check_compile_arguments(*, loss=None, jit_compile=False, **kwargs) -> None:
    """Checks :meth:`jem_tf.JEM.compile`'s arguments: the loss is the JEM objective, so ``loss`` and
    ``loss_weights`` are an error rather than being ignored, and ``jit_compile`` is ``True``, ``False`` or
    ``"auto"``. ``kwargs``: the other ``compile`` arguments (``metrics`` and ``weighted_metrics`` are Keras's own)."""
    for name, value in (("loss", loss), ("loss_weights", kwargs.get("loss_weights"))):
        if value is not None:
            raise ValueError(
                f"JEM.compile does not take `{name}`: the JEM objective is the loss (its weights are JEM's "
                f"pyx_weight, px_weight, pxy_weight and energy_l2_weight). Received {name}={value!r}")
    if jit_compile not in (True, False, "auto"):
        raise ValueError(f"`jit_compile` must be True, False or 'auto'; received {jit_compile!r}")
