"""Mode ``samples``: sample grids from fresh chains, the replay buffer and one long chain, with their
energies and the classifier's confidence on them."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from jem_tf import figures, seeds
from jem_tf import metrics as metrics_lib
from jem_tf.evaluation.common import energies, predict_logits, save_grid
from jem_tf.model.jem import JEM


def _sample_summary(model: JEM, samples: np.ndarray, labels: Optional[np.ndarray] = None) -> dict:
    """Count, mean energy, mean top-class confidence and pixel range of ``samples``, and with ``labels`` the
    share classified as the class they were conditioned on."""
    logits = predict_logits(model, samples).astype(np.float64)
    summary = {"num": int(len(samples)), "energy_mean": float(energies(logits).mean()),
               "max_softmax_mean": float(metrics_lib.softmax(logits).max(axis=1).mean()),
               "pixel_min": float(samples.min()), "pixel_max": float(samples.max())}
    if labels is not None:
        summary["classified_as_conditioning_class"] = float((logits.argmax(1) == labels).mean())
    return summary


def start_distribution(model: JEM) -> str:
    """Where the model's own sampler starts fresh chains: ``"class_gaussian"`` or ``"uniform"`` (the value
    of ``TrainConfig.chain_init``); the samples and Fréchet modes start there too."""
    return "uniform" if model.chain_init is None else "class_gaussian"


def evaluate_samples(model: JEM, *, out_dir: str, reference_images: np.ndarray, num_samples: int = 64,
                     sample_steps: int = 200, per_class: int = 8, long_chain_steps: int = 1000,
                     long_chain_num: int = 8, long_chain_snapshots: int = 10, seed: int = 0) -> dict:
    """Sample grids (PNG) with energies and confidences: fresh-noise unconditional and class-conditional
    samples, replay-buffer chains, and a long chain with snapshots and an energy trace."""
    for name, value in (("num_samples", num_samples), ("sample_steps", sample_steps), ("per_class", per_class),
                        ("long_chain_num", long_chain_num), ("long_chain_snapshots", long_chain_snapshots)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"`{name}` must be an int >= 1; received {value!r}")
    if not (isinstance(long_chain_steps, int) and long_chain_steps >= 0):
        raise ValueError(f"`long_chain_steps` must be an int >= 0; received {long_chain_steps!r}")
    k = model.num_classes
    results = {"reference": _sample_summary(model, reference_images)}

    start = start_distribution(model)
    x = model.sample(num_samples, seed=seed + seeds.SAMPLES_UNCONDITIONAL, n_steps=sample_steps)
    results["unconditional"] = {**_sample_summary(model, x), "init": start, "n_steps": sample_steps,
                                "file": os.path.basename(save_grid(os.path.join(out_dir, "samples_unconditional.png"),
                                                                   x, model))}
    labels = np.repeat(np.arange(k), per_class).astype(np.int32)
    # The same chains' starting points: how much of the class agreement the start alone already gives.
    x = model.sample(len(labels), seed=seed + seeds.SAMPLES_CONDITIONAL, n_steps=0, labels=labels)
    results["conditional_start"] = {**_sample_summary(model, x, labels), "init": start, "n_steps": 0}
    x = model.sample(len(labels), seed=seed + seeds.SAMPLES_CONDITIONAL, n_steps=sample_steps, labels=labels)
    results["conditional"] = {**_sample_summary(model, x, labels), "init": start, "n_steps": sample_steps,
                              "layout": f"row i = class i, {per_class} per row",
                              "file": os.path.basename(save_grid(os.path.join(out_dir, "samples_conditional.png"),
                                                                 x, model, columns=per_class))}
    x = model.sample(num_samples, seed=seed + seeds.SAMPLES_BUFFER, n_steps=0, init="buffer")
    results["buffer"] = {**_sample_summary(model, x), "init": "replay buffer (as stored, no extra steps)",
                         "file": os.path.basename(save_grid(os.path.join(out_dir, "samples_buffer.png"), x, model))}

    if long_chain_steps > 0:
        checkpoints = np.unique(np.linspace(0, long_chain_steps, long_chain_snapshots + 1).round().astype(int))
        x = model.sample(long_chain_num, seed=seed + seeds.SAMPLES_LONG_CHAIN, n_steps=0)
        snapshots, chain_energies = [x], [energies(predict_logits(model, x))]
        for i, (a, b) in enumerate(zip(checkpoints[:-1], checkpoints[1:])):
            segment_seed = np.array([seed + seeds.SAMPLES_LONG_CHAIN, i + 1], np.int64)
            x = model.refine(x, n_steps=int(b - a), seed=segment_seed, settings="sampler")
            snapshots.append(x)
            chain_energies.append(energies(predict_logits(model, x)))
        # Rows = chains, columns = snapshots in step order.
        grid = np.stack(snapshots, axis=1).reshape(-1, *model.image_shape)
        chain_energies = np.stack(chain_energies)
        reference = results["reference"]["energy_mean"]
        results["long_chain"] = {
            **_sample_summary(model, x), "init": start, "n_steps": long_chain_steps,
            "snapshot_steps": checkpoints.tolist(), "energy_mean_per_snapshot": chain_energies.mean(axis=1).tolist(),
            "layout": "row = chain, column = snapshot",
            "file": os.path.basename(save_grid(os.path.join(out_dir, "samples_long_chain.png"), grid, model,
                                               columns=len(checkpoints))),
            "energy_trace": os.path.basename(figures.energy_trace(
                checkpoints, chain_energies, os.path.join(out_dir, "long_chain_energy.png"), reference=reference,
                title=f"{long_chain_num} chains from {'uniform noise' if start == 'uniform' else 'class Gaussians'}")),
        }
    results["settings"] = {"sampler": model.sampler.get_config(), "seed": seed, "value_range": list(model.value_range)}
    return results
