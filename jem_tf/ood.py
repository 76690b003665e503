"""Out-of-distribution scores of a JEM, and a detector chosen without looking at any OOD test set.

One implementation, used by ``evaluate`` (every score on every OOD set), the serving export (the chosen
detector inside the ``energy`` signature) and the tuner's combined objective. Every score is oriented so
that **higher = more in-distribution**.

Components (raw per-image scores, computed in TensorFlow from the backbone alone):

* ``log_px``: ``logsumexp_y f(x)[y]``, the JEM's unnormalised log-density (Grathwohl et al., ICLR 2020).
* ``max_softmax``: ``max_y p(y|x)``, the classifier baseline (Hendrycks & Gimpel, ICLR 2017).
* ``grad_norm``: ``-||d log p(x)/dx||_2``, the paper's "approximate mass" (Grathwohl et al. 2020).
* ``energy_t``: ``T logsumexp_y f(x)[y] / T`` with ``T`` from temperature scaling on the validation split
  (the negated energy score of Liu et al., NeurIPS 2020).
* ``mahalanobis``: ``-min_c (h - mu_c)^T Sigma^-1 (h - mu_c)`` in the penultimate features ``h``, with class
  means and a tied covariance of the training split (Lee et al., NeurIPS 2018).
* ``png_bits``: the input's complexity ``L(x)``, the length in bits of its lossless PNG (DEFLATE) encoding
  (Serrà et al., ICLR 2020, arXiv 1909.11480). Not a score alone: it corrects the likelihood.

Detectors combine *terms*, each a component, optionally standardised with the mean and standard deviation
of the validation split and optionally two-sided (``-|z|``: atypical in either direction), either by a
weighted sum or by their minimum (``reduce="min"``: an input atypical in any one term is flagged). The
candidates (:func:`default_candidates`) are every component alone, Serrà et al.'s ``S(x) = log2 p(x) +
L(x)`` as published, standardised sums of the JEM's likelihood or features with the input complexity (a
likelihood-based score fails on inputs *simpler* than the data; Nalisnick et al., ICLR 2019), and the
"atypical in any" minima of the density, the feature distance and the complexity.

**Selection** (:func:`select_detector`, rule :data:`SELECTION_RULE`) sees only the in-distribution
validation split and images :mod:`jem_tf.outliers` makes from it, in two roles: *outliers* to flag
(inverted, patch-shuffled, noised, outlined, mosaic), which rank the candidates by their worst AUROC, and
*accepted shifts* (blurred, low-contrast, translated), which never count against a candidate and are
reported with the share each candidate accepts. None of them is a reported OOD set. The threshold is set
so that a fraction ``tpr`` (default 95 %) of the validation images is called in-distribution.

A likelihood ratio against a background model trained on perturbed inputs (Ren et al., NeurIPS 2019) was
considered and not built: it needs a second EBM trained per dataset, doubling the training cost that the
fast recipe exists to cut; the compressor plays the background model's part at no training cost (Serrà et
al. make this point).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from jem_tf import outliers

COMPONENTS = {
    "log_px": "logsumexp_y f(x)[y] (JEM unnormalised log p(x); Grathwohl et al. 2020)",
    "max_softmax": "max_y p(y|x) (Hendrycks & Gimpel 2017)",
    "grad_norm": "-||d log p(x)/dx||_2 (approximate mass; Grathwohl et al. 2020)",
    "energy_t": "T * logsumexp_y f(x)[y] / T, T fitted on the validation split (Liu et al. 2020)",
    "mahalanobis": "-min_c Mahalanobis distance of the penultimate features to the class means, tied covariance "
                   "of the training split (Lee et al. 2018)",
    "png_bits": "input complexity L(x): bits of the lossless PNG encoding (Serrà et al. 2020)",
}
REDUCTIONS = ("sum", "min")
_LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------- components
def penultimate_model(backbone: keras.Model) -> Optional[keras.Model]:
    """A model mapping images to ``(features, logits)``, the features being the input of the backbone's last
    layer; ``None`` when the backbone is not a functional model (then there is no ``mahalanobis``)."""
    try:
        return keras.Model(backbone.inputs, [backbone.layers[-1].input, backbone.outputs[0]])
    except (AttributeError, ValueError, TypeError, IndexError):
        return None


def png_bits(images: tf.Tensor, value_range: Sequence[float]) -> tf.Tensor:
    """float32 ``[N]``: the size in bits of each image's PNG encoding (8-bit, default zlib level), after
    mapping ``value_range`` to 0..255."""
    low, high = value_range
    pixels = tf.cast(tf.round(tf.clip_by_value((images - low) / (high - low), 0.0, 1.0) * 255.0), tf.uint8)
    lengths = tf.map_fn(lambda image: tf.strings.length(tf.io.encode_png(image)), pixels,
                        fn_output_signature=tf.int32)
    return 8.0 * tf.cast(lengths, tf.float32)


class OODScorer:
    """The components of a trained backbone's OOD scores, computed in TensorFlow.

    Args:
        backbone: The JEM's (or a classifier's) logits network.
        value_range: The images' value range.
        temperature: ``T`` of ``energy_t``.
        class_means: ``[K, D]`` class means of the penultimate features (``mahalanobis``).
        precision: ``[D, D]`` inverse of the tied feature covariance (``mahalanobis``).

    Use :meth:`fit` to estimate the temperature and the feature statistics from data.
    """

    def __init__(self, backbone: keras.Model, *, value_range: Sequence[float] = (-1.0, 1.0), temperature: float = 1.0,
                 class_means: Optional[np.ndarray] = None, precision: Optional[np.ndarray] = None):
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` must be a finite number > 0; received {temperature!r}")
        if (class_means is None) != (precision is None):
            raise ValueError("Pass both `class_means` and `precision` (Mahalanobis statistics) or neither.")
        self.backbone = backbone
        self.value_range = tuple(float(v) for v in value_range)
        self.temperature = float(temperature)
        self.features_and_logits = penultimate_model(backbone)
        self.class_means = None if class_means is None else np.asarray(class_means, np.float32)
        self.precision = None if precision is None else np.asarray(precision, np.float32)
        self._score_fns = {}

    @property
    def available(self) -> Tuple[str, ...]:
        """The components this scorer can compute."""
        return tuple(name for name in COMPONENTS if name != "mahalanobis" or self.class_means is not None)

    @classmethod
    def fit(cls, model, *, train_images: Optional[np.ndarray] = None, train_labels: Optional[np.ndarray] = None,
            val_images: Optional[np.ndarray] = None, val_labels: Optional[np.ndarray] = None,
            temperature: Optional[float] = None, batch_size: int = 256) -> "OODScorer":
        """A scorer for ``model`` (a :class:`~jem_tf.JEM`): the temperature fitted on the validation split
        (1 without one; ``temperature``: one fitted there already) and the Mahalanobis statistics of the
        training split (none without one)."""
        from jem_tf.evaluation.metrics import fit_temperature  # the evaluation package imports this module

        scorer = cls(model.backbone, value_range=model.value_range)
        if temperature is not None:
            scorer.temperature = float(temperature)
        elif val_images is not None and len(val_images) > 0:
            logits = scorer.arrays(val_images, ["logits"], batch_size=batch_size)["logits"]
            scorer.temperature = fit_temperature(logits, val_labels)
        if train_images is not None and len(train_images) > 0 and scorer.features_and_logits is not None:
            features = scorer.arrays(train_images, ["features"], batch_size=batch_size)["features"]
            scorer.class_means, scorer.precision = tied_gaussian(features, np.asarray(train_labels),
                                                                 num_classes=model.num_classes)
        return scorer

    def components(self, images: tf.Tensor, names: Sequence[str]) -> Dict[str, tf.Tensor]:
        """``{name: float32 [N]}`` for each of ``names`` (components, or ``"logits"``/``"features"``), from
        one forward pass (plus one backward pass for ``grad_norm``). Pure TensorFlow: traced into the
        serving signatures."""
        unknown = sorted(set(names) - set(COMPONENTS) - {"logits", "features"})
        if unknown:
            raise ValueError(f"Unknown OOD components {unknown}; expected some of {list(COMPONENTS)}")
        if "mahalanobis" in names and self.class_means is None:
            raise ValueError("The `mahalanobis` score needs feature statistics: OODScorer.fit(..., train_images=...).")
        if ("mahalanobis" in names or "features" in names) and self.features_and_logits is None:
            raise ValueError("The `mahalanobis` score needs a functional backbone (its penultimate layer).")
        images = tf.convert_to_tensor(images, tf.float32)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            if self.features_and_logits is not None:
                features, logits = self.features_and_logits(images, training=False)
                features = tf.reshape(tf.cast(features, tf.float32), [tf.shape(images)[0], -1])
            else:
                features, logits = None, self.backbone(images, training=False)
            logits = tf.cast(logits, tf.float32)
            log_px = tf.reduce_logsumexp(logits, axis=1)
            total_log_px = tf.reduce_sum(log_px)
        out = {}
        if "grad_norm" in names:
            gradient = tape.gradient(total_log_px, images)
            out["grad_norm"] = -tf.sqrt(tf.reduce_sum(tf.square(gradient), axis=[1, 2, 3]))
        if "log_px" in names:
            out["log_px"] = log_px
        if "max_softmax" in names:
            out["max_softmax"] = tf.reduce_max(tf.nn.softmax(logits, axis=1), axis=1)
        if "energy_t" in names:
            out["energy_t"] = self.temperature * tf.reduce_logsumexp(logits / self.temperature, axis=1)
        if "mahalanobis" in names:
            centered = features[:, None, :] - tf.constant(self.class_means)[None]  # [N, K, D]
            distances = tf.einsum("nkd,de,nke->nk", centered, tf.constant(self.precision), centered)
            out["mahalanobis"] = -tf.reduce_min(distances, axis=1)
        if "png_bits" in names:
            out["png_bits"] = png_bits(images, self.value_range)
        if "logits" in names:
            out["logits"] = logits
        if "features" in names:
            out["features"] = features
        return out

    def arrays(self, images: np.ndarray, names: Sequence[str], *, batch_size: int = 256) -> Dict[str, np.ndarray]:
        """:meth:`components` of numpy ``images`` in batches (one compiled function per set of names), as
        float64 numpy arrays."""
        key = tuple(sorted(names))
        fn = self._score_fns.get(key)
        if fn is None:
            image_shape = tuple(self.backbone.input_shape[1:])
            fn = self._score_fns[key] = tf.function(
                lambda x: self.components(x, key),
                input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])
        images = np.asarray(images, np.float32)
        parts = [fn(tf.constant(images[a:a + batch_size])) for a in range(0, len(images), batch_size)]
        if not parts:
            raise ValueError("No images to score.")
        return {name: np.concatenate([p[name].numpy() for p in parts]).astype(np.float64) for name in key}

    def parameters(self) -> dict:
        """JSON-serialisable description of the fitted parameters (the arrays by shape)."""
        return {"temperature": self.temperature, "value_range": list(self.value_range),
                "mahalanobis": None if self.class_means is None else {
                    "class_means_shape": list(self.class_means.shape), "covariance": "tied, training split"}}


def tied_gaussian(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                  ridge: float = 1e-6) -> Tuple[np.ndarray, np.ndarray]:
    """``(class_means [K, D], precision [D, D])`` of ``features``: per-class means and the inverse of the
    shared (tied) within-class covariance, with a small ridge relative to its mean variance."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels).astype(int)
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"Every class needs training features for the Mahalanobis score; missing {missing}.")
    means = np.stack([features[labels == c].mean(axis=0) for c in range(num_classes)])
    centered = features - means[labels]
    covariance = centered.T @ centered / len(features)
    covariance += ridge * max(float(np.trace(covariance)) / len(covariance), 1e-12) * np.eye(len(covariance))
    return means.astype(np.float32), np.linalg.pinv(covariance, hermitian=True).astype(np.float32)


# ------------------------------------------------------------------------------------- detectors
@dataclasses.dataclass(frozen=True)
class Term:
    """``weight * t((component - center) / scale)`` with ``t = -|.|`` when ``two_sided``, else identity."""

    component: str
    weight: float = 1.0
    center: float = 0.0
    scale: float = 1.0
    two_sided: bool = False
    standardized: bool = False  # center/scale come from the validation split (set by `fitted`)


@dataclasses.dataclass(frozen=True)
class OODDetector:
    """A named combination of :class:`Term` s (their sum, or with ``reduce="min"`` the lowest of them: an
    input atypical in any one term is flagged); ``threshold``: ``score >= threshold`` is in-distribution."""

    name: str
    terms: Tuple[Term, ...]
    description: str = ""
    threshold: Optional[float] = None
    reduce: str = "sum"  # "sum": the weighted terms added; "min": the lowest weighted term (atypical in any)

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"`reduce` must be one of {REDUCTIONS}; received {self.reduce!r}")

    @property
    def components(self) -> Tuple[str, ...]:
        return tuple(sorted({term.component for term in self.terms}))

    def fitted(self, validation_components: Mapping[str, np.ndarray]) -> "OODDetector":
        """A copy whose standardised terms take their center and scale from the validation components."""
        terms = []
        for term in self.terms:
            if term.standardized:
                values = np.asarray(validation_components[term.component], np.float64)
                term = dataclasses.replace(term, center=float(np.mean(values)),
                                           scale=float(max(np.std(values), 1e-12)))
            terms.append(term)
        return dataclasses.replace(self, terms=tuple(terms))

    def combine(self, components: Mapping[str, "np.ndarray | tf.Tensor"]):
        """The detector's score from component values (numpy or TensorFlow, same formula)."""
        total = None
        for term in self.terms:
            z = (components[term.component] - term.center) / term.scale
            if term.two_sided:
                z = -abs(z)
            z = term.weight * z
            if total is None:
                total = z
            elif self.reduce == "sum":
                total = total + z
            else:  # min(a, b) written so that numpy arrays and tensors take the same formula
                total = 0.5 * (total + z - abs(total - z))
        return total

    def with_threshold(self, validation_scores: np.ndarray, *, tpr: float = 0.95) -> "OODDetector":
        """A copy with the threshold that calls a fraction ``tpr`` of ``validation_scores`` in-distribution."""
        if not 0.0 < tpr <= 1.0:
            raise ValueError(f"`tpr` must be in (0, 1]; received {tpr!r}")
        threshold = float(np.quantile(np.asarray(validation_scores, np.float64), 1.0 - tpr, method="lower"))
        return dataclasses.replace(self, threshold=threshold)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "threshold": self.threshold,
                "reduce": self.reduce, "terms": [dataclasses.asdict(term) for term in self.terms]}

    @classmethod
    def from_dict(cls, values: Mapping) -> "OODDetector":
        return cls(name=values["name"], description=values.get("description", ""),
                   threshold=values.get("threshold"), reduce=values.get("reduce", "sum"),
                   terms=tuple(Term(**term) for term in values["terms"]))


def single(component: str) -> OODDetector:
    """A detector that is one component as it is."""
    return OODDetector(component, (Term(component),), COMPONENTS[component])


def default_candidates(available: Sequence[str]) -> List[OODDetector]:
    """The candidate detectors (see the module docstring), restricted to the ``available`` components."""
    candidates = [single(name) for name in ("log_px", "max_softmax", "grad_norm", "energy_t", "mahalanobis")]
    candidates.append(OODDetector(
        "serra_log_px", (Term("log_px", weight=1.0 / _LN2), Term("png_bits")),
        "log2 p(x) + L(x): Serrà et al. 2020's complexity-corrected likelihood as published (alpha = 1)"))
    for base in ("log_px", "mahalanobis"):
        for weight in (0.5, 1.0, 2.0):
            candidates.append(OODDetector(
                f"{base}+{weight:g}*complexity_typicality",
                (Term(base, standardized=True), Term("png_bits", weight=weight, standardized=True, two_sided=True)),
                f"z({base}) - {weight:g} |z(L(x))|: {base} plus a penalty for inputs whose PNG complexity is "
                "atypical for the data in either direction (z-scores of the validation split)"))
    for weight in (0.5, 1.0, 2.0):
        candidates.append(OODDetector(
            f"log_px+{weight:g}*png_bits", (Term("log_px", standardized=True),
                                            Term("png_bits", weight=weight, standardized=True)),
            f"z(log p(x)) + {weight:g} z(L(x)): Serrà et al.'s correction with a weight fitted to the scales"))
    candidates.append(OODDetector(
        "log_px+mahalanobis", (Term("log_px", standardized=True), Term("mahalanobis", standardized=True)),
        "z(log p(x)) + z(Mahalanobis score): the JEM's density and its feature-space distance"))
    # Atypical in any one: the lowest of the per-component z-scores. The density and the input complexity
    # are two-sided (too likely or too simple is as atypical as the opposite); the feature distance is not.
    typical = {"log_px": Term("log_px", standardized=True, two_sided=True),
               "mahalanobis": Term("mahalanobis", standardized=True),
               "png_bits": Term("png_bits", standardized=True, two_sided=True)}
    for parts in (("log_px", "png_bits"), ("log_px", "mahalanobis"), ("mahalanobis", "png_bits"),
                  ("log_px", "mahalanobis", "png_bits")):
        candidates.append(OODDetector(
            "any_atypical(" + ",".join(parts) + ")", tuple(typical[p] for p in parts),
            "min(" + ", ".join("-|z(" + p + ")|" if typical[p].two_sided else "z(" + p + ")" for p in parts)
            + "): flagged when atypical in any one of them (z-scores of the validation split)", reduce="min"))
    return [c for c in candidates if set(c.components) <= set(available)]


# ------------------------------------------------------------------------------------- selection
def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """AUROC with in-distribution as the positive class (ties count one half)."""
    from scipy.stats import rankdata

    scores_in, scores_out = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
    ranks = rankdata(np.concatenate([scores_in, scores_out]))
    n_in, n_out = len(scores_in), len(scores_out)
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0) / (n_in * n_out))


SELECTION_RULE = ("max over candidates of the worst AUROC of the validation images against each outlier kind "
                  "made from them; candidates within the sampling error of the best worst AUROC (its Hanley-McNeil "
                  "standard error, at least 1e-3) are tied and the tie goes to the higher mean outlier AUROC, "
                  "then the larger share of accepted-shift images accepted at the threshold; accepted shifts never "
                  "count against a candidate; threshold at the TPR on the validation split")


def auroc_standard_error(value: float, n_in: int, n_out: int) -> float:
    """The standard error of an AUROC ``value`` measured on ``n_in`` positives and ``n_out`` negatives
    (Hanley & McNeil, Radiology 1982)."""
    a = min(max(float(value), 1e-6), 1.0 - 1e-6)
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    variance = (a * (1 - a) + (n_in - 1) * (q1 - a * a) + (n_out - 1) * (q2 - a * a)) / (n_in * n_out)
    return math.sqrt(max(variance, 0.0))


def select_detector(scorer: OODScorer, val_images: np.ndarray, *, candidates: Optional[Sequence[OODDetector]] = None,
                    outlier_kinds: outliers.Kinds = outliers.OUTLIER_KINDS,
                    accepted_shifts: outliers.Kinds = outliers.ACCEPTED_SHIFTS, tpr: float = 0.95, seed: int = 0,
                    batch_size: int = 256,
                    validation_components: Optional[Mapping[str, np.ndarray]] = None) -> Tuple[OODDetector, dict]:
    """``(detector, report)``: the candidate chosen by :data:`SELECTION_RULE`, its standardisation and
    threshold (at ``tpr``) fitted on the validation images. Nothing else is seen: no test split, no OOD
    dataset; only ``val_images`` and what :mod:`jem_tf.outliers` makes from them.

    ``outlier_kinds``: inputs to flag, which rank the candidates; ``accepted_shifts``: shifts to accept,
    which never count against a candidate (reported: each candidate's AUROC against them and the share it
    accepts at its threshold). Either is a list of built-in kind names or a ``{name: function}`` mapping
    (:mod:`jem_tf.outliers`).

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
        raise ValueError(f"Selecting an OOD detector needs at least 20 validation images; received {len(val_images)}.")
    candidates = default_candidates(scorer.available) if candidates is None else list(candidates)
    if not candidates:
        raise ValueError("No candidate OOD detector can be computed with this scorer.")
    needed = sorted({name for candidate in candidates for name in candidate.components})
    if validation_components is not None and set(needed) <= set(validation_components):
        in_components = validation_components
    else:
        in_components = scorer.arrays(val_images, needed, batch_size=batch_size)
    functions = {**outlier_functions, **shift_functions}
    made = {kind: scorer.arrays(outliers.make(kind, val_images, value_range=scorer.value_range, seed=seed + 1 + i,
                                              function=functions[kind]), needed, batch_size=batch_size)
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
            "worst": min(per_kind.values()), "mean": float(np.mean(list(per_kind.values()))), **per_kind,
            "accepted_shifts": {kind: {"auroc": auroc(scores_in, scores[kind]), "accepted": accepted[kind]}
                                for kind in shift_names},
            "mean_accepted": float(np.mean(list(accepted.values()))) if accepted else None}
    best_worst = max(row["worst"] for row in table.values())
    tolerance = max(1e-3, auroc_standard_error(best_worst, len(val_images), len(val_images)))
    finalists = [name for name, row in table.items() if row["worst"] >= best_worst - tolerance]
    chosen = max(finalists, key=lambda name: (table[name]["mean"], table[name]["mean_accepted"] or 0.0,
                                              table[name]["worst"]))
    report = {"rule": SELECTION_RULE, "outlier_kinds": list(outlier_names), "accepted_shifts": list(shift_names),
              "num_validation_images": int(len(val_images)), "tpr": tpr, "seed": seed, "tie_tolerance": tolerance,
              "finalists": finalists, "chosen": chosen, "candidates": table}
    return fitted[chosen], report


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
                     outlier_kinds: outliers.Kinds = outliers.OUTLIER_KINDS,
                     accepted_shifts: outliers.Kinds = outliers.ACCEPTED_SHIFTS,
                     batch_size: int = 256) -> FittedDetector:
    """The OOD detector an export carries, fitted without any OOD data.

    With ``select`` (default) the detector is chosen by :func:`select_detector` among
    :func:`default_candidates` on ``calibration_images`` (held-out in-distribution images, normally the
    run's validation split) and the ``outlier_kinds`` and ``accepted_shifts`` made from them
    (:mod:`jem_tf.outliers`); otherwise it is ``log_px`` alone. The temperature
    is fitted on ``calibration_labels`` when given, the Mahalanobis statistics on the training split when
    given. ``calibration_split`` names where the images come from (recorded in the metadata).
    """
    calibration_images = np.asarray(calibration_images, np.float32)
    model.check_arrays(calibration_images, calibration_labels)
    if len(calibration_images) < 20:
        raise ValueError(f"OOD calibration needs at least 20 held-out images; received {len(calibration_images)}.")
    scorer = OODScorer.fit(model, train_images=train_images, train_labels=train_labels,
                           val_images=calibration_images if calibration_labels is not None else None,
                           val_labels=calibration_labels, batch_size=batch_size)
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
