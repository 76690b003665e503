"""Choosing a model's test-time refinement settings on its validation split (:func:`choose_refinement`, by
:data:`RULE`) and the settings an evaluation uses (:func:`resolve_refinement`). The settings themselves are the
model's (:class:`jem_tf.model.refinement.RefinementSettings`); the choice attacks the model with PGD
(:mod:`jem_tf.evaluation.attacks`), so it sits with the evaluation.

It sees a model only through ``model.logits(x, training=False)``, ``model.value_range``, ``model.refine``,
``model.refinement`` and ``model.sampler`` (duck-typed).
"""

from __future__ import annotations

import collections
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from jem_tf import seeds
from jem_tf.choices import REFINEMENT_SOURCES
from jem_tf.errors import UsageError
from jem_tf.evaluation.attacks import NORMS, PGD
from jem_tf.model.refinement import RefinementSettings

RULE = ("rule v2: PGD attacks the plain classifier on the validation images at every budget of "
        "`attack_eps` (non-adaptive: the attack never sees the refinement); a candidate (n_steps x step_size, "
        "fixed noise_std and grad_clamp) qualifies when its refined accuracy is at least the plain accuracy "
        "minus `tolerance` on the clean validation images and at least the plain accuracy on the attacked "
        "images of every budget; the chosen one has the largest mean gain over the budgets (ties: the smaller "
        "budget n_steps * step_size, then fewer steps); no qualifying candidate with a positive gain: no "
        "refinement (0 steps)")
# The budgets the choice attacks (fractions of the pixel range): those the robustness targets are quoted at.
DEFAULT_ATTACK_EPS = {"linf": (0.01, 0.02, 0.05), "l2": (0.5, 1.0)}
DEFAULT_ATTACK_STEPS = 10
# Step sizes multiply the (clamped) energy gradient, whose per-pixel size depends on the model (often
# well under 1): the grid spans three decades; the accuracy test of the rule removes the harmful ones.
DEFAULT_STEP_SIZES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
DEFAULT_N_STEPS = (1, 2, 5, 10, 20)


RefinementChoice = collections.namedtuple("RefinementChoice", ["settings", "candidates", "plain"])
RefinementChoice.__doc__ = """What :func:`choose_refinement` returns: the chosen :class:`RefinementSettings`,
the measured candidates (a list of dicts: n_steps, step_size, accuracy, energy_mean, attacked_accuracy (per
budget), gain, qualifies) and the plain validation figures (accuracy, energy_mean, attacked_accuracy,
num_images)."""


def _predict(model, images, batch_size):
    return np.concatenate([model.logits(tf.constant(images[a:a + batch_size]), training=False).numpy()
                           for a in range(0, len(images), batch_size)])


def _attacked_validation(model, images, labels, *, attack_eps, attack_steps, seed, batch_size):
    """``{budget name: adversarial images}``: PGD on the plain classifier at every budget of ``attack_eps``."""
    low, high = model.value_range
    attacked = {}

    def logits_fn(x):
        return model.logits(x, training=False)  # float32

    for norm in sorted(attack_eps):
        attack = PGD(logits_fn, image_shape=images.shape[1:], norm=norm, steps=attack_steps, value_range=(low, high))
        for eps in attack_eps[norm]:
            attacked[f"{norm}_eps_{eps:g}"] = attack(images, labels, eps=float(eps) * (high - low), seed=seed,
                                                     batch_size=batch_size)
    return attacked


def choose_refinement(model, val_images: np.ndarray, val_labels: np.ndarray, *,
                      step_sizes: Sequence[float] = DEFAULT_STEP_SIZES, n_steps: Sequence[int] = DEFAULT_N_STEPS,
                      noise_std: float = 0.0, grad_clamp: Optional[float] = 1.0, tolerance: float = 0.005,
                      attack_eps: Optional[Mapping[str, Sequence[float]]] = None,
                      attack_steps: int = DEFAULT_ATTACK_STEPS, max_images: int = 1000, seed: int = 0,
                      batch_size: int = 256, split_name: str = "validation") -> RefinementChoice:
    """Chooses refinement settings for ``model`` on held-out validation images by :data:`RULE`.

    The first ``max_images`` validation images are attacked with PGD at every budget of ``attack_eps``
    (against the plain classifier); every candidate ``(k, step_size)`` refines the clean and the attacked
    images ``k`` steps. The chosen settings keep the clean validation accuracy within ``tolerance``, never
    lower the accuracy on the attacked images of any budget, and raise it the most on average; refinement that
    does not help is not used (0 steps). Never pass test images: the choice is part of the model.

    Args:
        model: A :class:`jem_tf.JEM` (anything with ``logits``, ``value_range`` and ``refine``).
        val_images, val_labels: Validation images in the model's value range and their int labels.
        step_sizes: Candidate step sizes (input units). Default :data:`DEFAULT_STEP_SIZES`.
        n_steps: Candidate numbers of steps (each >= 1). Default :data:`DEFAULT_N_STEPS`.
        noise_std: Noise of every candidate. Default 0 (then the longer candidates continue the shorter
            ones exactly; with noise they continue them with fresh seeds).
        grad_clamp: Per-pixel gradient clamp of every candidate. Default 1.0.
        tolerance: Clean accuracy the refinement may cost, as a fraction (0.005 = half a point). Default 0.005.
        attack_eps: ``{norm: budgets}`` attacked on the validation images, in fractions of the pixel range.
            Default :data:`DEFAULT_ATTACK_EPS`; ``{}``: no attacked images (then no candidate has a gain and
            nothing is chosen).
        attack_steps: PGD iterations of those attacks. Default :data:`DEFAULT_ATTACK_STEPS`.
        max_images: Validation images used. Default 1000.
        seed: Seed of the attacks' random starts and of the refinement noise. Default 0.
        batch_size: Images refined at once. Default 256.
        split_name: Name of the split recorded in the settings' ``source``. Default ``"validation"``.

    Returns:
        A :data:`RefinementChoice`.

    Example:
        >>> choice = choose_refinement(model, x_val, y_val)
        >>> model.refinement = choice.settings
    """
    val_images = np.asarray(val_images, np.float32)[:max_images]
    val_labels = np.asarray(val_labels).astype(np.int64)[:max_images]
    attack_eps = DEFAULT_ATTACK_EPS if attack_eps is None else attack_eps
    if len(val_images) == 0 or val_labels.shape != (len(val_images),):
        raise ValueError(f"`val_images` and `val_labels` must be N >= 1 images and N labels; received "
                         f"{val_images.shape} and {val_labels.shape}")
    if not step_sizes or any(not s > 0 for s in step_sizes):
        raise ValueError(f"`step_sizes` must be numbers > 0; received {step_sizes!r}")
    if not n_steps or any(not (isinstance(k, int) and k >= 1) for k in n_steps):
        raise ValueError(f"`n_steps` must be ints >= 1; received {n_steps!r}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"`tolerance` must be in [0, 1); received {tolerance!r}")
    if set(attack_eps) - set(NORMS) or any(not e > 0 for budgets in attack_eps.values() for e in budgets):
        raise ValueError(f"`attack_eps` must map norms {NORMS} to budgets > 0; received {attack_eps!r}")
    attacked = _attacked_validation(model, val_images, val_labels, attack_eps=attack_eps,
                                    attack_steps=attack_steps, seed=seed, batch_size=batch_size)
    # The clean and attacked images are refined and predicted together: one call per candidate.
    names, count = ["clean", *attacked], len(val_images)

    def measure(x):
        """Accuracy on every image set of ``x`` (the sets stacked) and the clean images' mean energy."""
        logits = _predict(model, x, batch_size)
        accuracy = {name: float((logits[i * count:(i + 1) * count].argmax(1) == val_labels).mean())
                    for i, name in enumerate(names)}
        return accuracy, float(-np.logaddexp.reduce(logits[:count].astype(np.float64), axis=1).mean())

    stacked = np.concatenate([val_images, *attacked.values()])
    plain_of, plain_energy = measure(stacked)
    plain_accuracy, plain_attacked = plain_of["clean"], {name: plain_of[name] for name in attacked}
    checkpoints = sorted(set(int(k) for k in n_steps))
    candidates = []
    for step_size in sorted(float(s) for s in step_sizes):
        x, done = stacked, 0
        for k in checkpoints:
            segment = RefinementSettings(n_steps=k - done, step_size=step_size, noise_std=noise_std,
                                         grad_clamp=grad_clamp)
            x = np.concatenate([model.refine(x[a:a + batch_size], settings=segment,
                                             seed=np.array([seed, k * seeds.REFINE_STEPS_STRIDE + a], np.int64))
                                for a in range(0, len(x), batch_size)])
            done = k
            accuracy_of, energy_mean = measure(x)
            attacked_accuracy = {name: accuracy_of[name] for name in attacked}
            gains = [attacked_accuracy[name] - plain_attacked[name] for name in attacked]
            qualifies = bool(accuracy_of["clean"] >= plain_accuracy - tolerance and all(g >= 0 for g in gains))
            candidates.append({"n_steps": k, "step_size": step_size, "accuracy": accuracy_of["clean"],
                               "energy_mean": energy_mean, "attacked_accuracy": attacked_accuracy,
                               "gain": float(np.mean(gains)) if gains else 0.0, "qualifies": qualifies})
    plain = {"accuracy": plain_accuracy, "energy_mean": plain_energy, "attacked_accuracy": plain_attacked,
             "num_images": int(len(val_images)), "attack": f"PGD-{attack_steps} on the plain classifier",
             "attack_eps": {norm: [float(e) for e in budgets] for norm, budgets in attack_eps.items()}}
    where = f"{len(val_images)} {split_name} images"
    helpful = [c for c in candidates if c["qualifies"] and c["gain"] > 0]
    if not helpful:
        settings = RefinementSettings(
            n_steps=0, step_size=min(step_sizes), noise_std=noise_std, grad_clamp=grad_clamp,
            source=f"chosen on {where} by rule v2: no candidate raised the attacked accuracy without a cost")
        return RefinementChoice(settings, candidates, plain)
    best = max(helpful, key=lambda c: (c["gain"], -c["n_steps"] * c["step_size"], -c["n_steps"]))
    settings = RefinementSettings(
        n_steps=best["n_steps"], step_size=best["step_size"], noise_std=noise_std, grad_clamp=grad_clamp,
        source=(f"chosen on {where} by rule v2 (tolerance {tolerance:g}, PGD-{attack_steps}): clean accuracy "
                f"{plain_accuracy:.4f} -> {best['accuracy']:.4f}, attacked accuracy +{best['gain'] * 100:.2f} "
                "points on average"))
    return RefinementChoice(settings, candidates, plain)




def resolve_refinement(model, source: str = "model", *, val_images: Optional[np.ndarray] = None,
                       val_labels: Optional[np.ndarray] = None, seed: int = 0,
                       batch_size: int = 256) -> RefinementSettings:
    """The refinement settings an evaluation uses.

    Args:
        model: A :class:`jem_tf.JEM`.
        source: ``"model"`` (default: the settings saved with the model; when it has none and validation data
            is given, chosen on it by :func:`choose_refinement`; else the training sampler's), ``"choose"``
            (chosen anew on the validation data, which is then required) or ``"sampler"`` (the training
            sampler's step size, noise and clamp with 10 steps: the behaviour before settings were chosen).
        val_images, val_labels: The validation split (never test images).
        seed, batch_size: Of :func:`choose_refinement`.
    """
    if source not in REFINEMENT_SOURCES:
        raise ValueError(f"`refinement` must be one of {REFINEMENT_SOURCES}; received {source!r}")
    has_validation = val_images is not None and len(val_images) > 0
    if source == "sampler":
        return RefinementSettings.from_sampler(model.sampler, source="the training sampler's settings (requested)")
    if source == "model" and model.refinement is not None:
        return model.refinement
    if has_validation:
        return choose_refinement(model, val_images, val_labels, seed=seed, batch_size=batch_size).settings
    if source == "choose":
        raise UsageError("refinement='choose' needs a validation split (refinement is never chosen on test data)")
    return model.refinement_settings
