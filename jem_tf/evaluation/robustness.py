"""Mode ``robustness``: accuracy under PGD attacks, without and with SGLD refinement before classifying; the
refined classifier is attacked twice: non-adaptively (PGD on the plain classifier, then refinement) and
adaptively (BPDA through the refinement, with EOT when the refinement is random)."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from jem_tf.evaluation.attacks import NORMS, PGD
from jem_tf.evaluation.common import predict_logits, refine_in_batches
from jem_tf.evaluation.settings import DEFAULT_EOT_SAMPLES
from jem_tf.model.generation import refinement_fn
from jem_tf.model.jem import JEM
from jem_tf.model.refinement import RefinementSettings


def evaluate_robustness(model: JEM, images: np.ndarray, labels: np.ndarray, *, eps: Mapping[str, Sequence[float]],
                        steps: int = 20, refinement: Optional[RefinementSettings] = None, max_examples: int = 500,
                        eot_samples: int = DEFAULT_EOT_SAMPLES, seed: int = 0, batch_size: int = 256) -> dict:
    """Accuracy under PGD attacks at each ``eps`` (in [0, 1] pixel units, scaled to the model's value range):

    * ``accuracy``: the plain classifier attacked;
    * ``accuracy_refined``: the same adversarial images refined with ``refinement`` before classifying (the
      non-adaptive attack: it never saw the refinement);
    * ``accuracy_refined_bpda``: the refined classifier attacked adaptively: PGD whose forward pass refines
      and whose backward pass treats the refinement as the identity (BPDA), averaging each step's gradient over
      ``eot_samples`` draws of the refinement noise when it has any (EOT);
    * ``accuracy_refined_worst``: refined, counting an image only if it survives both attacks (BPDA can be the
      weaker one when the refinement moves images far from where it starts).

    ``refinement`` defaults to the model's :attr:`~jem_tf.JEM.refinement_settings`; the report names it.
    """
    unknown = sorted(set(eps) - set(NORMS))
    if unknown:
        raise ValueError(f"Unknown norms {unknown}; expected some of {NORMS}")
    refinement = model.refinement_settings if refinement is None else refinement
    if not isinstance(refinement, RefinementSettings):
        raise ValueError(f"`refinement` must be RefinementSettings or None; received {refinement!r}")
    images, labels = images[:max_examples], labels[:max_examples]
    low, high = model.value_range
    scale = high - low
    eot = eot_samples if refinement.is_random else 1

    def correct(x):
        return predict_logits(model, x, batch_size=batch_size).argmax(1) == labels

    def accuracy(x):
        return float(correct(x).mean())

    def refined_correct(x):
        return correct(refine_in_batches(model, x, settings=refinement, seed=seed, batch_size=batch_size))

    def refined_accuracy(x):
        return float(refined_correct(x).mean())

    def logits_fn(x):
        return model.logits(x, training=False)

    results = {"clean": {"accuracy": accuracy(images), "accuracy_refined": refined_accuracy(images)}}
    defence = refinement_fn(model, refinement)
    for norm, values in eps.items():
        attack = PGD(logits_fn, image_shape=model.image_shape, norm=norm, steps=steps, value_range=model.value_range)
        adaptive = PGD(logits_fn, image_shape=model.image_shape, norm=norm, steps=steps,
                       value_range=model.value_range, preprocess=defence, eot_samples=eot)
        for e in values:
            x_adv = attack(images, labels, eps=float(e) * scale, seed=seed, batch_size=batch_size)
            x_bpda = adaptive(images, labels, eps=float(e) * scale, seed=seed, batch_size=batch_size)
            non_adaptive, bpda = refined_correct(x_adv), refined_correct(x_bpda)
            results[f"{norm}_eps_{e:g}"] = {"norm": norm, "eps_pixel_scale": float(e),
                                            "eps_input_units": float(e) * scale, "accuracy": accuracy(x_adv),
                                            "accuracy_refined": float(non_adaptive.mean()),
                                            "accuracy_refined_bpda": float(bpda.mean()),
                                            "accuracy_refined_worst": float((non_adaptive & bpda).mean())}
    results["settings"] = {
        "num_examples": int(len(labels)), "attack": f"PGD, {steps} steps, step 2.5*eps/steps, random start",
        "attacks": {
            "accuracy": "PGD on the plain classifier f(x)",
            "accuracy_refined": "non-adaptive: the PGD images of the plain classifier, refined before classifying",
            "accuracy_refined_bpda": ("adaptive: PGD on the refined classifier, BPDA (refinement = identity in the "
                                      "backward pass)" + (f", EOT over {eot} noise draws per step" if eot > 1 else
                                                          ", no EOT (the refinement is deterministic)")),
            "accuracy_refined_worst": "refined, an image counts only if it survives both attacks above"},
        "eps_units": f"fraction of the pixel range; input units = eps * {scale:g}",
        "refinement": refinement.describe(), "refine_steps": refinement.n_steps, "seed": seed}
    return results
