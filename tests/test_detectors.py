"""jem_tf.ood.detectors: a detector's formula, threshold and round trip, and its candidates."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import gaussian_backbone

from jem_tf import ood
from jem_tf.ood import OODDetector, OODScorer, Term, single


def test_detector_formula_threshold_and_round_trip():
    components = {"log_px": np.array([1.0, 2.0, 3.0, 4.0]), "png_bits": np.array([100.0, 80.0, 120.0, 100.0])}
    detector = OODDetector("d", (Term("log_px", standardized=True),
                                 Term("png_bits", weight=2.0, standardized=True, two_sided=True)))
    fitted = detector.fitted(components)
    z_px = (components["log_px"] - 2.5) / np.std(components["log_px"])
    z_bits = (components["png_bits"] - 100.0) / np.std(components["png_bits"])
    np.testing.assert_allclose(fitted.combine(components), z_px - 2.0 * np.abs(z_bits))
    thresholded = fitted.with_threshold(fitted.combine(components), tpr=0.75)
    scores = fitted.combine(components)
    # At least 75 % pass, and not one image more than that needs (the scores are distinct).
    assert len(np.unique(scores)) == len(scores)
    assert 0.75 <= np.mean(scores >= thresholded.threshold) < 0.75 + 1 / len(scores)
    assert OODDetector.from_dict(thresholded.to_dict()) == thresholded
    with pytest.raises(ValueError, match="tpr"):
        fitted.with_threshold(components["log_px"], tpr=0.0)


def test_a_min_detector_flags_inputs_atypical_in_any_term():
    components = {"a": np.array([0.0, 5.0, 0.0, -1.0]), "b": np.array([0.0, 0.0, -5.0, 1.0])}
    detector = OODDetector("any", (Term("a", two_sided=True), Term("b", weight=2.0)), reduce="min")
    np.testing.assert_allclose(detector.combine(components), [0.0, -5.0, -10.0, -1.0])
    tensors = {k: tf.constant(v, tf.float32) for k, v in components.items()}
    np.testing.assert_allclose(detector.combine(tensors).numpy(), detector.combine(components), rtol=1e-6)
    assert OODDetector.from_dict(detector.to_dict()) == detector
    assert OODDetector.from_dict({k: v for k, v in single("log_px").to_dict().items() if k != "reduce"}).reduce == "sum"
    with pytest.raises(ValueError, match="`reduce` must be one of"):
        OODDetector("bad", (Term("a"),), reduce="max")
    names = {c.name for c in ood.default_candidates(ood.COMPONENTS)}
    assert "any_atypical(log_px,mahalanobis,png_bits)" in names


def test_default_candidates_need_only_what_the_scorer_has(scorer):
    names = {c.name for c in ood.default_candidates(scorer.available)}
    assert "log_px" in names and "serra_log_px" in names and "mahalanobis" not in names
    assert not any("mahalanobis" in name for name in names)
    with pytest.raises(ValueError, match="feature statistics"):
        scorer.arrays(np.zeros((2, 4, 4, 1), np.float32), ["mahalanobis"])
    with pytest.raises(ValueError, match="at least 20"):
        ood.select_detector(scorer, np.zeros((5, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match="temperature"):
        OODScorer(gaussian_backbone(), temperature=0.0)


def test_the_detectors_import_no_orchestration_module():
    """jem_tf.ood sits before the evaluation, the export and the tuner: it imports only leaf modules."""
    import ast
    import os

    allowed = {"jem_tf.choices", "jem_tf.errors", "jem_tf.metrics", "jem_tf.ood.outliers", "jem_tf.seeds",
               "jem_tf.ood.scorer", "jem_tf.ood.detectors", "jem_tf.ood.selection"}
    directory = os.path.dirname(ood.__file__)
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(directory, name)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jem_tf"):
                    modules = ({f"{node.module}.{a.name}" for a in node.names}
                               if node.module in ("jem_tf", "jem_tf.ood") else {node.module})
                    assert modules <= allowed, (name, modules)


def test_the_candidates_of_a_converted_model_include_every_one_of_its_classifiers():
    own = ood.default_candidates(["log_px", "max_softmax", "grad_norm", "energy_t", "mahalanobis", "png_bits"])
    available = [c for d in own for c in d.components]
    available += ["source_" + c for c in available if c != "png_bits"]
    everything = {d.name: d for d in ood.default_candidates(available)}
    for detector in own:
        twin = everything["source_" + detector.name]
        assert ood.origin(detector) == "this model" and ood.origin(twin) == "source classifier"
        assert [t.component for t in twin.terms] == [
            t.component if t.component == "png_bits" else "source_" + t.component for t in detector.terms]
        assert [(t.weight, t.two_sided, t.standardized) for t in twin.terms] == [
            (t.weight, t.two_sided, t.standardized) for t in detector.terms]
    assert ood.origin(everything["log_px+source_mahalanobis"]) == "both"
    assert len(everything) == 2 * len(own) + 1


def test_named_candidates_are_the_default_ones_in_the_order_asked_and_refuse_unknown_names():
    chosen = ood.named_candidates(["log_px+0.5*complexity_typicality", "source_log_px", "log_px"])
    assert [c.name for c in chosen] == ["log_px+0.5*complexity_typicality", "source_log_px", "log_px"]
    everything = {c.name: c for c in ood.default_candidates(list(ood.COMPONENTS) + ["source_" + c for c in
                                                                                    ood.COMPONENTS])}
    assert chosen == [everything[c.name] for c in chosen]
    for names, message in ((["log_px", "log_pz"], r"\(unknown: log_pz\); the candidates: log_px, max_softmax"),
                           (["log_px", "log_px"], "distinct candidate names"), ([], "distinct"),
                           ("log_px", "received 'log_px'")):
        with pytest.raises(ValueError, match=message):
            ood.named_candidates(names)
