"""jem_tf.ood.selection: a detector chosen on validation images only, ties within the standard error."""

import numpy as np
import pytest
from conftest import gaussian_backbone, two_small_cnns

from jem_tf import choices as names
from jem_tf import metrics, ood
from jem_tf.ood import OODDetector, OODScorer, Term, outliers, single


def _scaled(factor):
    return lambda images, value_range, seed: images * factor


def test_accepted_shifts_never_count_against_a_candidate():
    """log p(x) flags wide inputs and calls shrunk ones *more* typical than the data; a two-sided z-score
    flags both. With shrunk inputs as outliers the two-sided score wins; as an accepted shift they do not
    count, and the one that accepts them is chosen."""
    scorer = OODScorer(gaussian_backbone(), value_range=(-4.0, 4.0))
    validation = np.random.default_rng(0).normal(0, 0.5, (200, 4, 4, 1)).astype(np.float32)
    candidates = [single("log_px"), OODDetector("typical", (Term("log_px", standardized=True, two_sided=True),))]
    _, report = ood.select_detector(scorer, validation, candidates=candidates, accepted_shifts=[],
                                    outlier_kinds={"wide": _scaled(3.0), "shrunk": _scaled(0.2)})
    assert report["chosen"] == "typical" and report["candidates"]["log_px"]["shrunk"] < 0.01
    detector, report = ood.select_detector(scorer, validation, candidates=candidates,
                                           outlier_kinds={"wide": _scaled(3.0)},
                                           accepted_shifts={"shrunk": _scaled(0.2)})
    assert report["chosen"] == detector.name == "log_px"
    assert report["accepted_shifts"] == ["shrunk"] and report["outlier_kinds"] == ["wide"]
    rows = report["candidates"]
    assert rows["log_px"]["worst"] == rows["typical"]["worst"] == 1.0
    assert rows["log_px"]["accepted_shifts"]["shrunk"]["accepted"] == 1.0
    assert rows["typical"]["accepted_shifts"]["shrunk"]["accepted"] < 0.05
    with pytest.raises(ValueError, match="both as outliers and as accepted shifts"):
        ood.select_detector(scorer, validation, outlier_kinds=["inverted"], accepted_shifts=["inverted"])
    with pytest.raises(ValueError, match="at least one outlier kind"):
        ood.select_detector(scorer, validation, outlier_kinds=[])


class SpyScorer(OODScorer):
    """Records every image it is asked to score."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def arrays(self, images, names, *, batch_size=256):
        self.seen.append(np.asarray(images, np.float32).copy())
        return super().arrays(images, names, batch_size=batch_size)


def _rows(images):
    return {row.tobytes() for row in np.asarray(images, np.float32)}


def _validation_and_what_selection_makes(rng):
    """40 validation images drawn from ``rng`` and the rows the selection may see: them and every kind it makes."""
    validation = rng.normal(0, 0.5, (40, 4, 4, 1)).astype(np.float32)
    kinds = names.OUTLIER_KINDS + names.ACCEPTED_SHIFTS
    made = [outliers.make(kind, validation, value_range=(-4.0, 4.0), seed=1 + i) for i, kind in enumerate(kinds)]
    return validation, len(kinds), _rows(validation).union(*(_rows(m) for m in made))


def test_selection_sees_only_the_validation_images_and_what_it_makes_from_them():
    backbone = gaussian_backbone()
    validation, _, allowed = _validation_and_what_selection_makes(np.random.default_rng(0))
    scorer = SpyScorer(backbone, value_range=(-4.0, 4.0))
    detector, report = ood.select_detector(scorer, validation, seed=0)
    assert all(_rows(batch) <= allowed for batch in scorer.seen)
    assert report["chosen"] == detector.name and report["outlier_kinds"] == list(names.OUTLIER_KINDS)
    assert report["accepted_shifts"] == list(names.ACCEPTED_SHIFTS)


def test_inside_the_evaluation_the_selection_gets_the_validation_images_only(tmp_path):
    # Changing the test images and the OOD sets does not change the choice or its threshold; the evaluation then
    # reports it on those sets.
    from jem_tf.evaluation import evaluate_ood

    rng = np.random.default_rng(0)
    backbone = gaussian_backbone()
    validation, num_kinds, allowed = _validation_and_what_selection_makes(rng)
    test = rng.normal(0, 0.5, (30, 4, 4, 1)).astype(np.float32)
    ood_sets = {"wide": rng.normal(0, 2.0, (30, 4, 4, 1)).astype(np.float32)}

    class FakeModel:
        value_range = (-4.0, 4.0)

    FakeModel.backbone = backbone
    chosen = []
    for shift in (0.0, 1.0):
        spy = SpyScorer(backbone, value_range=(-4.0, 4.0))
        result = evaluate_ood(FakeModel(), test + shift, {k: v + shift for k, v in ood_sets.items()},
                              out_dir=str(tmp_path), scorer=spy, val_images=validation)
        chosen.append((result["detector"]["chosen"], result["detector"]["detector"]["threshold"]))
        selection_batches = spy.seen[:1 + num_kinds]
        assert all(_rows(batch) <= allowed for batch in selection_batches)
        assert result["detector"]["chosen"] in result["metrics"]
    assert chosen[0] == chosen[1]


def test_an_evaluation_restricted_to_named_candidates_reports_and_selects_among_them_alone(tmp_path):
    from jem_tf.evaluation import evaluate_ood

    rng = np.random.default_rng(0)
    backbone = gaussian_backbone()
    validation = rng.normal(0, 0.5, (40, 4, 4, 1)).astype(np.float32)
    test = rng.normal(0, 0.5, (30, 4, 4, 1)).astype(np.float32)

    class FakeModel:
        value_range = (-4.0, 4.0)

    FakeModel.backbone = backbone
    scorer = SpyScorer(backbone, value_range=(-4.0, 4.0))
    result = evaluate_ood(FakeModel(), test, {"wide": rng.normal(0, 2.0, (30, 4, 4, 1)).astype(np.float32)},
                          out_dir=str(tmp_path), scorer=scorer, val_images=validation,
                          candidates=ood.named_candidates(["max_softmax", "log_px"]))
    assert set(result["metrics"]) == {"max_softmax", "log_px"}
    assert set(result["detector"]["selection"]["candidates"]) == {"max_softmax", "log_px"}
    assert result["settings"]["candidates"] == ["max_softmax", "log_px"]
    assert result["detector"]["chosen"] in ("max_softmax", "log_px")
    with pytest.raises(ValueError, match="mahalanobis needs mahalanobis .*the scorer has log_px"):
        evaluate_ood(FakeModel(), test, {"wide": test}, out_dir=str(tmp_path), scorer=scorer,
                     candidates=ood.named_candidates(["mahalanobis"]))


def test_auroc_standard_error_and_the_tie_tolerance():
    # Hanley & McNeil's worked example: AUROC 0.8 with 50 and 50 cases has a standard error of about 0.043.
    assert abs(metrics.auroc_standard_error(0.8, 50, 50) - 0.043) < 0.002
    assert metrics.auroc_standard_error(0.9, 6000, 6000) < metrics.auroc_standard_error(0.9, 144, 144) / 5
    scorer = OODScorer(gaussian_backbone(), value_range=(-4.0, 4.0))
    validation = np.random.default_rng(0).normal(0, 0.5, (40, 4, 4, 1)).astype(np.float32)
    _, report = ood.select_detector(scorer, validation)
    best = max(row["worst"] for row in report["candidates"].values())
    assert report["tie_tolerance"] == max(1e-3, metrics.auroc_standard_error(best, 40, 40))
    assert report["chosen"] in report["finalists"]
    assert set(report["finalists"]) == {name for name, row in report["candidates"].items()
                                        if row["worst"] >= best - report["tie_tolerance"]}


def test_fit_ood_detector_of_a_converted_model_chooses_among_both_origins(tiny_data):
    from jem_tf import JEM

    x, y = tiny_data
    model_net, source_net = two_small_cnns()
    model = JEM(model_net, seed=0)
    fitted = ood.fit_ood_detector(model, x[:48], calibration_split="validation", calibration_labels=y[:48],
                                  train_images=x[48:], train_labels=y[48:], source_network=source_net)
    table = fitted.calibration["selection"]["candidates"]
    origins = {name: row["origin"] for name, row in table.items()}
    assert set(origins.values()) == {"this model", "source classifier", "both"}
    assert origins["source_mahalanobis"] == "source classifier" and origins["mahalanobis"] == "this model"
    # Ranked by one rule: the source classifier's own choice is the incumbent, and the chosen candidate has the
    # best worst AUROC among those no worse than it on any kind, up to the tie tolerance.
    selection = fitted.calibration["selection"]
    assert selection["incumbent"] == ood.choose({name: row for name, row in table.items()
                                                 if row["origin"] == "source classifier"},
                                                selection["outlier_kinds"], 48)["chosen"]
    assert selection["incumbent"] in selection["eligible"] and selection["chosen"] in selection["eligible"]
    best = max(table[name]["worst"] for name in selection["eligible"])
    assert table[selection["chosen"]]["worst"] >= best - selection["tie_tolerance"]
    assert fitted.scorer.source is not None and fitted.metadata()["parameters"]["source"]["network"] == "small_cnn"
    plain = ood.fit_ood_detector(model, x[:48], calibration_split="validation", calibration_labels=y[:48],
                                 train_images=x[48:], train_labels=y[48:])
    assert {row["origin"] for row in plain.calibration["selection"]["candidates"].values()} == {"this model"}
    assert plain.calibration["selection"]["incumbent"] is None


def _row(origin, **aurocs):
    return {"origin": origin, "worst": min(aurocs.values()), "mean": float(np.mean(list(aurocs.values()))),
            "mean_accepted": None, **aurocs}


def test_a_converted_models_detector_is_never_worse_than_its_classifiers_on_any_kind():
    """The JEM's candidate with the better worst AUROC loses a kind to the classifier's own choice by more than
    the standard error: the classifier's stays. One no worse anywhere and better on the worst kind wins."""
    kinds = ["edges", "flat"]
    table = {"source_a": _row("source classifier", edges=0.929, flat=0.989),
             "source_b": _row("source classifier", edges=0.900, flat=0.999),
             "jem": _row("this model", edges=0.941, flat=0.972),
             "both": _row("both", edges=0.935, flat=0.9885)}
    choice = ood.choose(table, kinds, 6000)
    assert choice["incumbent"] == "source_a"
    assert choice["eligible"] == ["source_a", "both"]  # 0.9885 is within flat's standard error (1e-3 here)
    assert choice["chosen"] == "both"
    table["both"] = _row("both", edges=0.935, flat=0.986)
    choice = ood.choose(table, kinds, 6000)
    assert choice["eligible"] == ["source_a"] and choice["chosen"] == "source_a"
    # Without the classifier's candidates (a model trained as a JEM) the rule ranks every candidate.
    plain = ood.choose({"jem": table["jem"], "other": _row("this model", edges=0.93, flat=0.99)}, kinds, 6000)
    assert plain["incumbent"] is None and plain["chosen"] == "jem" and plain["eligible"] == ["jem", "other"]
