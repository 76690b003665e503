"""Mode ``robustness``: accuracy under PGD attacks, with and without SGLD refinement before classifying."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from jem_tf.attacks import NORMS, PGD
from jem_tf.evaluation.common import predict_logits, refine_in_batches
from jem_tf.jem import JEM

# Budgets per norm (fractions of the pixel range) when none are given.
DEFAULT_PGD_EPS = {"linf": (0.03, 0.1), "l2": (0.5, 1.0)}


def evaluate_robustness(model: JEM, images: np.ndarray, labels: np.ndarray, *, eps: Mapping[str, Sequence[float]],
                        steps: int = 20, refine_steps: int = 10, max_examples: int = 500, seed: int = 0,
                        batch_size: int = 256) -> dict:
    """Accuracy under PGD attacks at each ``eps`` (in [0, 1] pixel units, scaled to the model's value
    range), with and without ``refine_steps`` SGLD refinement steps of the attacked inputs."""
    unknown = sorted(set(eps) - set(NORMS))
    if unknown:
        raise ValueError(f"Unknown norms {unknown}; expected some of {NORMS}")
    images, labels = images[:max_examples], labels[:max_examples]
    low, high = model.value_range
    scale = high - low

    def accuracy(x):
        return float((predict_logits(model, x, batch_size=batch_size).argmax(1) == labels).mean())

    def refined_accuracy(x):
        return accuracy(refine_in_batches(model, x, n_steps=refine_steps, seed=seed, batch_size=batch_size))

    results = {"clean": {"accuracy": accuracy(images), "accuracy_refined": refined_accuracy(images)}}
    for norm, values in eps.items():
        attack = PGD(lambda x: model.logits(x, training=False), image_shape=model.image_shape, norm=norm,
                     steps=steps, value_range=model.value_range)
        for e in values:
            x_adv = attack(images, labels, eps=float(e) * scale, seed=seed, batch_size=batch_size)
            results[f"{norm}_eps_{e:g}"] = {"norm": norm, "eps_pixel_scale": float(e),
                                            "eps_input_units": float(e) * scale, "accuracy": accuracy(x_adv),
                                            "accuracy_refined": refined_accuracy(x_adv)}
    results["settings"] = {
        "num_examples": int(len(labels)), "attack": f"PGD, {steps} steps, step 2.5*eps/steps, random start",
        "attack_gradients": "through the classifier f(x) only (refinement is not differentiated through)",
        "eps_units": f"fraction of the pixel range; input units = eps * {scale:g}",
        "refine_steps": refine_steps, "sampler": model.sampler.get_config(), "seed": seed}
    return results
