"""Mode ``ood``: out-of-distribution detection with several scores against loaded and synthetic sets."""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from jem_tf import figures
from jem_tf.data import load_dataset
from jem_tf.evaluation import metrics as metrics_lib
from jem_tf.evaluation.common import input_gradient_norms, predict_logits
from jem_tf.jem import JEM

SYNTHETIC_OOD = ("uniform", "constant", "permuted")
OOD_SCORES = {
    "log_px": "log p(x) = logsumexp_y f(x)[y] (unnormalised)",
    "max_softmax": "max_y p(y|x)",
    "grad_norm": "-||d log p(x) / dx||_2 (the paper's approximate mass; flat density = in-distribution)",
    "energy_t": "T * logsumexp_y f(x)[y] / T, T from temperature scaling (Liu et al. 2020, negated energy)",
}


def synthetic_ood_images(kind: str, like: np.ndarray, *, value_range: Sequence[float] = (-1.0, 1.0),
                         seed: int = 0) -> np.ndarray:
    """Synthetic out-of-distribution images shaped like ``like``:

    * ``uniform``: i.i.d. uniform noise on ``value_range``;
    * ``constant``: each image one uniform random value everywhere;
    * ``permuted``: each image of ``like`` with its pixel positions randomly permuted (channels stay
      together), which keeps the pixel histogram and destroys the structure.
    """
    rng = np.random.default_rng(seed)
    like = np.asarray(like, dtype=np.float32)
    low, high = value_range
    if kind == "uniform":
        return rng.uniform(low, high, size=like.shape).astype(np.float32)
    if kind == "constant":
        values = rng.uniform(low, high, size=(like.shape[0], 1, 1, 1))
        return np.broadcast_to(values, like.shape).astype(np.float32)
    if kind == "permuted":
        n, h, w, c = like.shape
        flat = like.reshape(n, h * w, c)
        order = np.argsort(rng.random((n, h * w)), axis=1)
        return np.take_along_axis(flat, order[..., None], axis=1).reshape(like.shape)
    raise ValueError(f"Unknown synthetic OOD set {kind!r}; expected one of {SYNTHETIC_OOD}")


def load_ood_sets(names: Sequence[str], test_images: np.ndarray, *, value_range, seed: int,
                  data_dir: Optional[str], max_images: Optional[int]) -> Dict[str, np.ndarray]:
    """``{name: images}`` for each OOD set name: a :data:`SYNTHETIC_OOD` set shaped like ``test_images``
    (the ``i``-th name seeded with ``seed + 1 + i``) or the test split of a dataset in ``data_dir``; each
    cut to its first ``max_images`` images when given."""
    sets = {}
    for i, name in enumerate(names):
        if name in SYNTHETIC_OOD:
            images = synthetic_ood_images(name, test_images, value_range=value_range, seed=seed + 1 + i)
        else:
            images = load_dataset(name, data_dir=data_dir).x_test
        sets[name] = images[:max_images] if max_images else images
    return sets


def ood_scores(model: JEM, images: np.ndarray, *, temperature: float = 1.0, scores: Sequence[str] = tuple(OOD_SCORES),
               batch_size: int = 256) -> Dict[str, np.ndarray]:
    """Every requested OOD score of ``images``, each oriented so that higher = more in-distribution."""
    unknown = sorted(set(scores) - set(OOD_SCORES))
    if unknown:
        raise ValueError(f"Unknown OOD scores {unknown}; expected some of {list(OOD_SCORES)}")
    logits = predict_logits(model, images, batch_size=batch_size).astype(np.float64)
    out = {}
    if "log_px" in scores:
        out["log_px"] = np.logaddexp.reduce(logits, axis=1)
    if "max_softmax" in scores:
        out["max_softmax"] = metrics_lib.softmax(logits).max(axis=1)
    if "grad_norm" in scores:
        out["grad_norm"] = -input_gradient_norms(model, images, batch_size=batch_size).astype(np.float64)
    if "energy_t" in scores:
        out["energy_t"] = temperature * np.logaddexp.reduce(logits / temperature, axis=1)
    return out


def evaluate_ood(model: JEM, in_images: np.ndarray, ood_sets: Mapping[str, np.ndarray], *, out_dir: str,
                 temperature: float = 1.0, temperature_source: str = "given",
                 scores: Sequence[str] = tuple(OOD_SCORES), tpr: float = 0.95, batch_size: int = 256) -> dict:
    """OOD detection metrics for every (score, OOD set) pair, plus one histogram PNG per score."""
    if not ood_sets:
        raise ValueError("`ood_sets` is empty; name at least one OOD set.")
    for name, images in ood_sets.items():
        if tuple(images.shape[1:]) != tuple(in_images.shape[1:]):
            raise ValueError(f"OOD set {name!r} has images of shape {tuple(images.shape[1:])}; the model takes "
                             f"{tuple(in_images.shape[1:])}.")
    # All sets scored in one pass (one compiled gradient function), then split.
    names = list(ood_sets)
    everything = np.concatenate([in_images] + [np.asarray(ood_sets[n], np.float32) for n in names])
    all_scores = ood_scores(model, everything, temperature=temperature, scores=scores, batch_size=batch_size)
    bounds = np.cumsum([len(in_images)] + [len(ood_sets[n]) for n in names])
    in_scores = {score: values[:bounds[0]] for score, values in all_scores.items()}
    out_scores = {name: {score: values[bounds[i]:bounds[i + 1]] for score, values in all_scores.items()}
                  for i, name in enumerate(names)}
    results = {score: {name: metrics_lib.ood_metrics(in_scores[score], out_scores[name][score], tpr=tpr)
                       for name in ood_sets} for score in in_scores}
    histograms = {}
    for score in in_scores:
        path = os.path.join(out_dir, f"ood_hist_{score}.png")
        figures.score_histograms({"in-distribution (test)": in_scores[score],
                                  **{name: out_scores[name][score] for name in ood_sets}},
                                 path, title=f"OOD score: {score}", xlabel=OOD_SCORES[score])
        histograms[score] = os.path.basename(path)
    summary = {score: {"in_mean": float(np.mean(in_scores[score])),
                       **{f"{name}_mean": float(np.mean(out_scores[name][score])) for name in ood_sets}}
               for score in in_scores}
    return {"metrics": results, "score_means": summary, "histograms": histograms,
            "settings": {"positive_class": "in-distribution", "scores": {s: OOD_SCORES[s] for s in in_scores},
                         "temperature": float(temperature), "temperature_source": temperature_source,
                         "tpr": tpr, "num_in": int(len(in_images)),
                         "ood_sets": {name: int(len(images)) for name, images in ood_sets.items()}}}
