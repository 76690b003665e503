"""Mode ``ood``: benchmarks every OOD detector of :mod:`jem_tf.ood` against loaded and synthetic OOD sets.

The detectors themselves (scores, combinations, the selection rule) live in :mod:`jem_tf.ood`; this module
makes or loads the OOD sets, measures each detector on them (:func:`jem_tf.metrics.ood_metrics`) and draws
the score histograms.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from jem_tf import choices as names
from jem_tf import figures, metrics, seeds
from jem_tf.data import is_image_folder_name, load_dataset, load_image_folder_images
from jem_tf.evaluation.settings import SYNTHETIC_OOD
from jem_tf.model.jem import JEM
from jem_tf.ood import COMPONENTS, OODDetector, OODScorer, default_candidates, outliers, select_detector

# The single scores (components that are scores by themselves); mode ``ood`` also reports the combined
# detectors of jem_tf.ood.default_candidates.
OOD_SCORES = {name: description for name, description in COMPONENTS.items() if name != "png_bits"}


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
    (the ``i``-th name seeded with ``seed + OOD_SET_OFFSET + i``, :data:`jem_tf.seeds.OOD_SET_OFFSET` = 1), the
    test split of a dataset in ``data_dir``, or the images of a folder (an image folder's ``test/``, class
    subfolders or images directly in it; :func:`jem_tf.data.load_image_folder_images`), resized to the size of
    ``test_images`` where they differ; each cut to its first ``max_images`` images when given."""
    sets = {}
    for i, name in enumerate(names):
        if name in SYNTHETIC_OOD:
            images = synthetic_ood_images(name, test_images, value_range=value_range,
                                          seed=seed + seeds.OOD_SET_OFFSET + i)
        elif is_image_folder_name(name):
            images = load_image_folder_images(name, image_size=tuple(test_images.shape[1:3])).x_test
        else:
            images = load_dataset(name, data_dir=data_dir, data_dir_flag="--ood-data-dir").x_test
        sets[name] = images[:max_images] if max_images else images
    return sets


def ood_scores(model: JEM, images: np.ndarray, *, temperature: float = 1.0,
               scores: Sequence[str] = ("log_px", "max_softmax", "grad_norm", "energy_t"),
               batch_size: int = 256) -> Dict[str, np.ndarray]:
    """The requested component scores of ``images`` (see :data:`jem_tf.ood.COMPONENTS`; ``mahalanobis``
    needs a fitted :class:`~jem_tf.ood.OODScorer`), each oriented so that higher = more in-distribution."""
    unknown = sorted(set(scores) - set(OOD_SCORES))
    if unknown:
        raise ValueError(f"Unknown OOD scores {unknown}; expected some of {list(OOD_SCORES)}")
    scorer = OODScorer(model.backbone, value_range=model.value_range, temperature=temperature)
    return scorer.arrays(images, list(scores), batch_size=batch_size)


def evaluate_ood(model: JEM, in_images: np.ndarray, ood_sets: Mapping[str, np.ndarray], *, out_dir: str,
                 scorer: Optional[OODScorer] = None, val_images: Optional[np.ndarray] = None,
                 candidates: Optional[Sequence[OODDetector]] = None, temperature_source: str = "given",
                 tpr: float = 0.95, seed: int = 0,
                 outlier_kinds: outliers.Kinds = names.OUTLIER_KINDS,
                 accepted_shifts: outliers.Kinds = names.ACCEPTED_SHIFTS, batch_size: int = 256) -> dict:
    """OOD detection metrics of every candidate detector of :mod:`jem_tf.ood` (each component alone and the
    combinations) on every OOD set, plus one histogram PNG per component and for the chosen detector.

    With ``val_images`` (the run's validation split) the detector the export would carry is selected by
    :func:`jem_tf.ood.select_detector` from those images and the ``outlier_kinds`` and ``accepted_shifts``
    made from them alone (:mod:`jem_tf.ood.outliers`), and reported as
    ``detector`` (``chosen``, its threshold, the selection table, and how it does on each OOD set here).
    ``scorer``: a fitted :class:`~jem_tf.ood.OODScorer` (default: temperature 1, no Mahalanobis).
    ``candidates``: the detectors to report and select among (default: every one of
    :func:`jem_tf.ood.default_candidates` the scorer can compute; e.g. :func:`jem_tf.ood.named_candidates`).

    Raises:
        ValueError: no OOD set, a set of another image shape, or a candidate needing a component ``scorer``
            cannot compute.
    """
    if not ood_sets:
        raise ValueError("`ood_sets` is empty; name at least one OOD set.")
    for name, images in ood_sets.items():
        if tuple(images.shape[1:]) != tuple(in_images.shape[1:]):
            raise ValueError(f"OOD set {name!r} has images of shape {tuple(images.shape[1:])}; the model takes "
                             f"{tuple(in_images.shape[1:])}.")
    scorer = scorer or OODScorer(model.backbone, value_range=model.value_range)
    if candidates is None:
        candidates = default_candidates(scorer.available)
    missing = {c.name: sorted(set(c.components) - set(scorer.available)) for c in candidates}
    if not candidates or any(missing.values()):
        raise ValueError("evaluate_ood's candidates must be computable by its scorer; "
                         + ("none given" if not candidates else "; ".join(
                             f"{name} needs {', '.join(parts)}" for name, parts in missing.items() if parts))
                         + f" (the scorer has {', '.join(scorer.available)})")
    components = sorted({name for candidate in candidates for name in candidate.components})
    chosen, selection, reference = None, None, None
    if val_images is not None and len(val_images) >= 20:
        reference = scorer.arrays(val_images, components, batch_size=batch_size)
        chosen, selection = select_detector(scorer, val_images, candidates=candidates, tpr=tpr, seed=seed,
                                            outlier_kinds=outlier_kinds, accepted_shifts=accepted_shifts,
                                            batch_size=batch_size, validation_components=reference)
    # All sets scored in one pass (one compiled function), then split.
    names = list(ood_sets)
    everything = np.concatenate([in_images] + [np.asarray(ood_sets[n], np.float32) for n in names])
    values = scorer.arrays(everything, components, batch_size=batch_size)
    bounds = np.cumsum([len(in_images)] + [len(ood_sets[n]) for n in names])

    def part(array, i):  # 0: in-distribution, i >= 1: the i-th OOD set
        return array[(bounds[i - 1] if i else 0):bounds[i]]

    # Standardised candidates take their centre/scale from the validation split (else the test split's
    # in-distribution images, which only shifts and scales each term: AUROCs of single terms are unchanged).
    if reference is None:
        reference = {name: part(v, 0) for name, v in values.items()}
    detectors = {candidate.name: candidate.fitted(reference) for candidate in candidates}
    if chosen is not None:
        detectors[chosen.name] = chosen
    scores = {name: detector.combine(values) for name, detector in detectors.items()}
    results = {name: {set_name: metrics.ood_metrics(part(score, 0), part(score, i + 1), tpr=tpr)
                      for i, set_name in enumerate(names)} for name, score in scores.items()}
    histograms = {}
    for name in [c for c in OOD_SCORES if c in scores] + ([chosen.name] if chosen is not None else []):
        path = os.path.join(out_dir, "ood_hist_" + re.sub(r"[^A-Za-z0-9_.+-]", "_", name.replace("*", "x")) + ".png")
        figures.score_histograms({"in-distribution (test)": part(scores[name], 0),
                                  **{set_name: part(scores[name], i + 1) for i, set_name in enumerate(names)}},
                                 path, title=f"OOD score: {name}", xlabel=detectors[name].description or name)
        histograms[name] = os.path.basename(path)
    summary = {name: {"in_mean": float(np.mean(part(score, 0))),
                      **{f"{set_name}_mean": float(np.mean(part(score, i + 1))) for i, set_name in enumerate(names)}}
               for name, score in scores.items()}
    report = {"metrics": results, "score_means": summary, "histograms": histograms,
              "settings": {"positive_class": "in-distribution", "candidates": [c.name for c in candidates],
                           "scores": {name: detector.description for name, detector in detectors.items()},
                           "temperature": float(scorer.temperature), "temperature_source": temperature_source,
                           "scorer": scorer.parameters(), "tpr": tpr, "num_in": int(len(in_images)),
                           "ood_sets": {name: int(len(images)) for name, images in ood_sets.items()}}}
    if chosen is None:
        report["detector"] = {"chosen": None, "why": "no validation split to select and calibrate a detector on "
                                                     "(never the test split)"}
    else:
        score_in = part(scores[chosen.name], 0)
        report["detector"] = {
            "chosen": chosen.name, "detector": chosen.to_dict(), "selection": selection,
            "test_tpr_at_threshold": float(np.mean(score_in >= chosen.threshold)),
            "ood_sets_flagged_at_threshold": {
                set_name: float(np.mean(part(scores[chosen.name], i + 1) < chosen.threshold))
                for i, set_name in enumerate(names)}}
    return report
