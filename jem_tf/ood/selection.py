"""The OOD detector an export carries, chosen without looking at any OOD test set.

**Selection** (:func:`select_detector`, rule :data:`SELECTION_RULE`) sees only the in-distribution
validation split and images :mod:`jem_tf.ood.outliers` makes from it, in two roles: *outliers* to flag
(inverted, patch-shuffled, noised, outlined, mosaic), which rank the candidates by their worst AUROC, and
*accepted shifts* (blurred, low-contrast, translated), which never count against a candidate and are
reported with the share each candidate accepts. None of them is a reported OOD set. The threshold is set
so that a fraction ``tpr`` (default 95 %) of the validation images is called in-distribution.

A converted model (:func:`jem_tf.JEM.from_classifier`) also has its source classifier's candidates. Their own
choice, by the same rule, is the *incumbent*: the flag the user already had. A candidate of the JEM replaces it
only when it is no worse on any outlier kind (:func:`choose`), so that conversion never trades one kind of
outlier for another on validation.

A likelihood ratio against a background model trained on perturbed inputs (Ren et al., NeurIPS 2019) was
considered and not built: it needs a second EBM trained per dataset, doubling the training cost that the
fast recipe exists to cut; the compressor plays the background model's part at no training cost (Serrà et
al. make this point).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from jem_tf import choices as names
from jem_tf import seeds
from jem_tf.errors import UsageError
from jem_tf.metrics import auroc, auroc_standard_error
from jem_tf.ood import outliers
from jem_tf.ood.detectors import OODDetector, default_candidates, origin, single
from jem_tf.ood.scorer import OODScorer

SELECTION_RULE = ("max over candidates of the worst AUROC of the validation images against each outlier kind "
                  "made from them; candidates within the sampling error of the best worst AUROC (its Hanley-McNeil "
                  "standard error, at least 1e-3) are tied and the tie goes to the higher mean outlier AUROC, "
                  "then the larger share of accepted-shift images accepted at the threshold; accepted shifts never "
                  "count against a candidate; for a converted model, the source classifier's candidates are ranked "
                  "the same way first and their choice is the incumbent: only candidates at least as good as the "
                  "incumbent on every outlier kind (within that AUROC's standard error, at least 1e-3) stay in the "
                  "running, so that conversion never makes the flag worse on validation; threshold at the TPR on "
                  "the validation split")


def select_detector(scorer: OODScorer, val_images: np.ndarray, *, candidates: Optional[Sequence[OODDetector]] = None,
                    outlier_kinds: outliers.Kinds = names.OUTLIER_KINDS,
                    accepted_shifts: outliers.Kinds = names.ACCEPTED_SHIFTS, tpr: float = 0.95, seed: int = 0,
                    batch_size: int = 256,
                    validation_components: Optional[Mapping[str, np.ndarray]] = None) -> Tuple[OODDetector, dict]:
    """``(detector, report)``: the candidate chosen by :data:`SELECTION_RULE`, its standardisation and
    threshold (at ``tpr``) fitted on the validation images. Nothing else is seen: no test split, no OOD
    dataset; only ``val_images`` and what :mod:`jem_tf.ood.outliers` makes from them.

    ``outlier_kinds``: inputs to flag, which rank the candidates; ``accepted_shifts``: shifts to accept,
    which never count against a candidate (reported: each candidate's AUROC against them and the share it
    accepts at its threshold). Either is a list of built-in kind names or a ``{name: function}`` mapping
    (:mod:`jem_tf.ood.outliers`).

    ``report``: every candidate's AUROC per kind, the rule, the kinds and their roles, and the choice.
    ``validation_components``: the scorer's components of ``val_images`` when the caller has them already
    (``scorer.arrays(val_images, ...)``), so they are not computed twice.
    """
    outlier_names, outlier_functions = outliers.resolve(outlier_kinds, role="outlier")
    shift_names, shift_functions = outliers.resolve(accepted_shifts, role="accepted shift")
    if not outlier_names:
        raise ValueError("Selecting an OOD detector needs at least one outlier kind.")
    both = sorted(set(outlier_names) & set(shift_names))
    if both:
        raise ValueError(f"Kinds {both} are given both as outliers and as accepted shifts; give each one role.")
    val_images = np.asarray(val_images, np.float32)
    if len(val_images) < 20:
        raise UsageError(f"Selecting an OOD detector needs at least 20 validation images; received {len(val_images)}.")
    candidates = default_candidates(scorer.available) if candidates is None else list(candidates)
    if not candidates:
        raise ValueError("No candidate OOD detector can be computed with this scorer.")
    needed = sorted({name for candidate in candidates for name in candidate.components})
    if validation_components is not None and set(needed) <= set(validation_components):
        in_components = validation_components
    else:
        in_components = scorer.arrays(val_images, needed, batch_size=batch_size)
    functions = {**outlier_functions, **shift_functions}
    made = {kind: scorer.arrays(outliers.make(kind, val_images, value_range=scorer.value_range,
                                              seed=seed + seeds.OUTLIER_KIND_OFFSET + i, function=functions[kind]),
                                needed, batch_size=batch_size)
            for i, kind in enumerate(outlier_names + shift_names)}
    table, fitted = {}, {}
    for candidate in candidates:
        detector = candidate.fitted(in_components)
        scores_in = detector.combine(in_components)
        detector = fitted[candidate.name] = detector.with_threshold(scores_in, tpr=tpr)
        scores = {kind: detector.combine(made[kind]) for kind in made}
        per_kind = {kind: auroc(scores_in, scores[kind]) for kind in outlier_names}
        accepted = {kind: float(np.mean(scores[kind] >= detector.threshold)) for kind in shift_names}
        table[candidate.name] = {
            "origin": origin(candidate), "worst": min(per_kind.values()),
            "mean": float(np.mean(list(per_kind.values()))), **per_kind,
            "accepted_shifts": {kind: {"auroc": auroc(scores_in, scores[kind]), "accepted": accepted[kind]}
                                for kind in shift_names},
            "mean_accepted": float(np.mean(list(accepted.values()))) if accepted else None}
    choice = choose(table, outlier_names, len(val_images))
    report = {"rule": SELECTION_RULE, "outlier_kinds": list(outlier_names), "accepted_shifts": list(shift_names),
              "num_validation_images": int(len(val_images)), "tpr": tpr, "seed": seed, **choice,
              "candidates": table}
    return fitted[choice["chosen"]], report


def choose(table: Mapping[str, dict], outlier_kinds: Sequence[str], num_images: int) -> dict:
    """The choice of :data:`SELECTION_RULE` from a selection table (``{name: {"origin", "worst", "mean",
    "mean_accepted", kind: AUROC, ...}}`` over ``num_images`` validation images and as many of each kind):
    ``{"incumbent", "eligible", "tie_tolerance", "finalists", "chosen"}``. ``incumbent`` is the choice among the
    source classifier's candidates (None without any) and ``eligible`` the candidates no worse than it on any
    kind: its AUROC there minus that AUROC's Hanley-McNeil standard error, at least 1e-3."""
    incumbent, eligible = None, list(table)
    source_side = [name for name, row in table.items() if row["origin"] == "source classifier"]
    if source_side:
        incumbent = _ranked(table, source_side, num_images)[0]
        floors = {kind: table[incumbent][kind] - _sampling_error(table[incumbent][kind], num_images)
                  for kind in outlier_kinds}
        eligible = [name for name, row in table.items() if all(row[kind] >= floors[kind] for kind in outlier_kinds)]
    chosen, finalists, tolerance = _ranked(table, eligible, num_images)
    return {"incumbent": incumbent, "eligible": eligible, "tie_tolerance": tolerance, "finalists": finalists,
            "chosen": chosen}


def _sampling_error(value: float, num_images: int) -> float:
    """The rule's margin for an AUROC of ``value`` over ``num_images`` in and out: its Hanley-McNeil standard
    error, at least 1e-3."""
    return max(1e-3, auroc_standard_error(value, num_images, num_images))


def _ranked(table: Mapping[str, dict], names: Sequence[str], num_images: int):
    """``(chosen, finalists, tolerance)`` among ``names`` by the rule: the best worst AUROC, ties within its
    standard error going to the higher mean, then the larger share of accepted shifts accepted."""
    best_worst = max(table[name]["worst"] for name in names)
    tolerance = _sampling_error(best_worst, num_images)
    finalists = [name for name in names if table[name]["worst"] >= best_worst - tolerance]
    chosen = max(finalists, key=lambda name: (table[name]["mean"], table[name]["mean_accepted"] or 0.0,
                                              table[name]["worst"]))
    return chosen, finalists, tolerance


@dataclasses.dataclass(frozen=True)
class FittedDetector:
    """What an export carries for OOD detection: the scorer (its fitted parameters), the chosen detector
    with its threshold, and how it was chosen and calibrated."""

    scorer: OODScorer
    detector: OODDetector
    calibration: dict

    def metadata(self) -> dict:
        """The export's ``ood`` metadata: the score, its parameters and where it was calibrated."""
        return {"score": self.detector.name, "description": self.detector.description,
                "threshold": self.detector.threshold, "detector": self.detector.to_dict(),
                "parameters": self.scorer.parameters(), **self.calibration,
                "rule": "is_in_distribution = ood_score >= threshold (higher ood_score = more in-distribution)"}


def fit_ood_detector(model, calibration_images: np.ndarray, *, calibration_split: str,
                     calibration_labels: Optional[np.ndarray] = None, train_images: Optional[np.ndarray] = None,
                     train_labels: Optional[np.ndarray] = None, select: bool = True, tpr: float = 0.95, seed: int = 0,
                     outlier_kinds: outliers.Kinds = names.OUTLIER_KINDS,
                     accepted_shifts: outliers.Kinds = names.ACCEPTED_SHIFTS,
                     batch_size: int = 256, source_network=None) -> FittedDetector:
    """The OOD detector an export carries, fitted without any OOD data.

    With ``select`` (default) the detector is chosen by :func:`select_detector` among
    :func:`default_candidates` on ``calibration_images`` (held-out in-distribution images, normally the
    run's validation split) and the ``outlier_kinds`` and ``accepted_shifts`` made from them
    (:mod:`jem_tf.ood.outliers`); otherwise it is ``log_px`` alone. The temperature
    is fitted on ``calibration_labels`` when given, the Mahalanobis statistics on the training split when
    given. ``calibration_split`` names where the images come from (recorded in the metadata).
    ``source_network``: for a converted model, the logits network of its classifier before the fine-tune
    (:func:`jem_tf.run.model_files.source_classifier_network`): the classifier's own candidates run too, fitted on
    the same images, so that the choice can fall on the detector the user already had.
    """
    calibration_images = np.asarray(calibration_images, np.float32)
    model.check_arrays(calibration_images, calibration_labels)
    if len(calibration_images) < 20:
        raise UsageError(f"OOD calibration needs at least 20 held-out images; received {len(calibration_images)}.")
    scorer = OODScorer.fit(model, train_images=train_images, train_labels=train_labels,
                           val_images=calibration_images if calibration_labels is not None else None,
                           val_labels=calibration_labels, batch_size=batch_size, source_network=source_network)
    candidates = default_candidates(scorer.available) if select else [single("log_px")]
    # The calibration images' components, computed once for the selection, the threshold and the achieved TPR.
    components = scorer.arrays(calibration_images, sorted({n for c in candidates for n in c.components}),
                               batch_size=batch_size)
    selection = None
    if select:
        detector, selection = select_detector(scorer, calibration_images, candidates=candidates, tpr=tpr, seed=seed,
                                              outlier_kinds=outlier_kinds, accepted_shifts=accepted_shifts,
                                              batch_size=batch_size, validation_components=components)
    else:
        detector = candidates[0].with_threshold(candidates[0].combine(components), tpr=tpr)
    scores = detector.combine(components)
    calibration = {"calibration_split": calibration_split, "num_calibration_images": int(len(calibration_images)),
                   "tpr": tpr, "achieved_tpr": float(np.mean(scores >= detector.threshold)),
                   "selection": selection}
    return FittedDetector(scorer, detector, calibration)
