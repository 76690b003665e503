"""The classifier's modes: ``accuracy`` (also after SGLD refinement of the inputs) and ``calibration``."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from jem_tf import figures
from jem_tf import metrics as metrics_lib
from jem_tf.evaluation.common import predict_logits, refine_in_batches
from jem_tf.model.jem import JEM
from jem_tf.model.refinement import RefinementSettings


def evaluate_accuracy(model: JEM, images: np.ndarray, labels: np.ndarray, *,
                      refine_steps: Optional[Sequence[int]] = None, refinement: Optional[RefinementSettings] = None,
                      seed: int = 0, batch_size: int = 256) -> dict:
    """Test accuracy on the inputs as given and after each number of SGLD refinement steps, with the
    ``refinement`` settings (default: the model's :attr:`~JEM.refinement_settings`; ``refine_steps`` default:
    their number of steps)."""
    refinement = model.refinement_settings if refinement is None else refinement
    refine_steps = (refinement.n_steps,) if refine_steps is None else tuple(refine_steps)
    results = {"accuracy": float((predict_logits(model, images, batch_size=batch_size).argmax(1) == labels).mean())}
    refined = {}
    for k in refine_steps:
        if k > 0:
            x = refine_in_batches(model, images, n_steps=int(k), settings=refinement, seed=seed, batch_size=batch_size)
            refined[str(k)] = float((predict_logits(model, x, batch_size=batch_size).argmax(1) == labels).mean())
    results["accuracy_after_refinement"] = refined
    results["settings"] = {"num_examples": int(len(labels)), "refine_steps": [int(k) for k in refine_steps],
                           "refinement": refinement.describe(), "seed": seed}
    return results


def evaluate_calibration(model: JEM, images: np.ndarray, labels: np.ndarray, *, out_dir: str,
                         val_images: Optional[np.ndarray] = None, val_labels: Optional[np.ndarray] = None,
                         num_bins: int = 20, temperature_scaling: bool = True, batch_size: int = 256) -> dict:
    """ECE/MCE/NLL/Brier on the test inputs, a reliability diagram, and (with validation data) the same
    after temperature scaling fitted on the validation data."""
    logits = predict_logits(model, images, batch_size=batch_size)
    results = {"uncalibrated": metrics_lib.calibration_metrics(logits, labels, num_bins=num_bins)}
    results["reliability_diagram"] = os.path.basename(figures.reliability_diagram(
        results["uncalibrated"]["bins"], os.path.join(out_dir, "reliability.png"),
        title=f"ECE {results['uncalibrated']['ece']:.4f} ({num_bins} bins)"))
    scaling = "off"
    if temperature_scaling and val_images is not None and len(val_images) > 0:
        temperature = metrics_lib.fit_temperature(predict_logits(model, val_images, batch_size=batch_size),
                                                  val_labels)
        results["temperature_scaled"] = metrics_lib.calibration_metrics(
            logits, labels, num_bins=num_bins, temperature=temperature)
        results["reliability_diagram_temperature_scaled"] = os.path.basename(figures.reliability_diagram(
            results["temperature_scaled"]["bins"], os.path.join(out_dir, "reliability_temperature_scaled.png"),
            title=f"T = {temperature:.3f}: ECE {results['temperature_scaled']['ece']:.4f}"))
        scaling = f"fitted on {len(val_images)} validation images (NLL minimised over log T)"
    elif temperature_scaling:
        scaling = "skipped: no validation split (never fitted on test data)"
    results["settings"] = {"num_examples": int(len(labels)), "num_bins": num_bins,
                           "ece_implementation": "jem_tf.metrics (tfp.stats.expected_calibration_error's definition)",
                           "temperature_scaling": scaling}
    return results
