"""OOD detectors: named combinations of score components, and the candidates the selection chooses from.

A detector combines *terms*, each a component (:data:`~jem_tf.ood.scorer.COMPONENTS`), optionally
standardised with the mean and standard deviation of the validation split and optionally two-sided
(``-|z|``: atypical in either direction), either by a weighted sum or by their minimum (``reduce="min"``: an
input atypical in any one term is flagged). The candidates (:func:`default_candidates`) are every component
alone, Serrà et al.'s ``S(x) = log2 p(x) + L(x)`` as published, standardised sums of the JEM's likelihood or
features with the input complexity (a likelihood-based score fails on inputs *simpler* than the data;
Nalisnick et al., ICLR 2019), and the "atypical in any" minima of the density, the feature distance and the
complexity. A converted model whose scorer carries its source classifier's adds every one of those candidates
computed by the classifier as it was before the fine-tune (``source_...``: the detector the user already had is
always in the running) and the JEM's density beside the classifier's feature distance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from jem_tf.ood.scorer import COMPONENTS, SOURCE, describe

REDUCTIONS = ("sum", "min")
_LN2 = math.log(2.0)


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
        # The highest threshold that lets at least ceil(tpr * n) of the n scores pass (score >= threshold): the
        # (n - ceil(tpr * n))-th smallest. (numpy's quantile(1 - tpr, "lower") picks index floor((1 - tpr)(n - 1)),
        # which lets more pass than asked for small n: all 4 of 4 at tpr 0.75.)
        scores = np.sort(np.asarray(validation_scores, np.float64).ravel())
        if scores.size == 0:
            raise ValueError("`validation_scores` must not be empty")
        must_pass = int(np.ceil(tpr * scores.size - 1e-9))
        return dataclasses.replace(self, threshold=float(scores[scores.size - must_pass]))

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
    return OODDetector(component, (Term(component),), describe(component))


def origin(detector: OODDetector) -> str:
    """``"source classifier"``, ``"both"`` or ``"this model"``: whose network a detector's components come from
    (``png_bits`` depends on the input alone)."""
    networks = {"source classifier" if name.startswith(SOURCE) else "this model"
                for name in detector.components if name != "png_bits"}
    return "both" if len(networks) > 1 else networks.pop() if networks else "this model"


def _from_source(detector: OODDetector) -> OODDetector:
    """The same detector computed by the source classifier (``png_bits`` stays the input's)."""
    terms = tuple(term if term.component == "png_bits" else dataclasses.replace(term, component=SOURCE + term.component)
                  for term in detector.terms)
    return dataclasses.replace(detector, name=SOURCE + detector.name, terms=terms,
                               description="the source classifier's " + detector.description)


def default_candidates(available: Sequence[str]) -> List[OODDetector]:
    """The candidate detectors (see the module docstring), restricted to the ``available`` components."""
    own = _own_candidates()
    candidates = own + [_from_source(candidate) for candidate in own]
    candidates.append(OODDetector(
        "log_px+source_mahalanobis", (Term("log_px", standardized=True),
                                      Term(SOURCE + "mahalanobis", standardized=True)),
        "z(log p(x)) + z(the source classifier's Mahalanobis score): the JEM's density and the original features' "
        "distance"))
    return [c for c in candidates if set(c.components) <= set(available)]


def named_candidates(names: Sequence[str]) -> List[OODDetector]:
    """The candidates of :func:`default_candidates` named ``names``, in that order, whatever a scorer can compute
    (a converted model's ``source_...`` ones included): a selection restricted to them, e.g. ``["log_px"]`` to
    compare training recipes by their density alone at a fraction of the full selection's cost.

    Raises:
        ValueError: ``names`` is empty, repeats a name or names no candidate (the message lists them all).
    """
    every = {candidate.name: candidate
             for candidate in default_candidates(tuple(COMPONENTS) + tuple(SOURCE + n for n in COMPONENTS))}
    unknown = [name for name in names if name not in every]
    if isinstance(names, str) or not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"detectors must be distinct candidate names; received {names!r}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                         + f"; the candidates: {', '.join(every)}")
    return [every[name] for name in names]


def _own_candidates() -> List[OODDetector]:
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
    return candidates
