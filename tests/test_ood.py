"""OOD scores on hand-made data where the answer is known, the detectors, and a selection that never sees
the sets it is evaluated on."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from jem_tf import choices as names
from jem_tf import metrics, ood
from jem_tf.ood import OODDetector, OODScorer, Term, outliers, single


def gaussian_backbone(dim=16):
    """One class whose logit is -|x|^2 / 2: log p(x) is the standard Gaussian log-density up to a constant,
    and the penultimate features are the pixels themselves."""
    inputs = keras.Input((4, 4, 1))
    flat = keras.layers.Flatten()(inputs)
    logit = keras.layers.Lambda(lambda t: -0.5 * keras.ops.sum(keras.ops.square(t), axis=1, keepdims=True))(flat)
    return keras.Model(inputs, logit)


@pytest.fixture(scope="module")
def scorer():
    return OODScorer(gaussian_backbone(), value_range=(-4.0, 4.0), temperature=2.0)


def test_log_px_and_gradient_norm_of_a_known_density(scorer):
    x = np.random.default_rng(0).normal(0, 0.7, (50, 4, 4, 1)).astype(np.float32)
    values = scorer.arrays(x, ["log_px", "grad_norm", "energy_t", "max_softmax"])
    squared = np.sum(x.reshape(50, -1).astype(np.float64) ** 2, axis=1)
    np.testing.assert_allclose(values["log_px"], -0.5 * squared, rtol=1e-5)
    # d/dx (-|x|^2 / 2) = -x, so the gradient norm is |x|.
    np.testing.assert_allclose(values["grad_norm"], -np.sqrt(squared), rtol=1e-5)
    # One class: T logsumexp(f / T) = f for any T; p(y|x) = 1.
    np.testing.assert_allclose(values["energy_t"], values["log_px"], rtol=1e-5)
    np.testing.assert_allclose(values["max_softmax"], 1.0)
    # A narrow Gaussian (in) against a wide one (out): log p(x) separates them almost perfectly.
    wide = np.random.default_rng(1).normal(0, 2.0, (50, 4, 4, 1)).astype(np.float32)
    assert metrics.auroc(values["log_px"], scorer.arrays(wide, ["log_px"])["log_px"]) > 0.99


def test_the_compressor_ranks_a_constant_image_as_simple():
    model = OODScorer(gaussian_backbone(), value_range=(-1.0, 1.0))
    rng = np.random.default_rng(0)
    constant = np.zeros((3, 4, 4, 1), np.float32)
    smooth = np.broadcast_to(np.linspace(-1, 1, 4, dtype=np.float32)[None, None, :, None], (3, 4, 4, 1)).copy()
    noise = rng.uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32)
    bits = {name: model.arrays(x, ["png_bits"])["png_bits"] for name, x in
            (("constant", constant), ("smooth", smooth), ("noise", noise))}
    assert bits["constant"].max() < bits["noise"].min() and bits["smooth"].max() <= bits["noise"].min()
    assert np.all(bits["constant"] == bits["constant"][0]) and bits["constant"][0] % 8 == 0


def test_mahalanobis_of_two_known_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 500)
    centers = np.array([[3.0, 0.0], [-3.0, 0.0]])
    features = centers[labels] + rng.normal(0, [1.0, 0.5], (1000, 2))
    means, precision = ood.tied_gaussian(features, labels, num_classes=2)
    np.testing.assert_allclose(means, centers, atol=0.15)
    np.testing.assert_allclose(precision, np.diag([1.0, 4.0]), rtol=0.15, atol=0.1)
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        ood.tied_gaussian(features[:500], labels[:500], num_classes=2)
    # In the scorer: features are the pixels; a point at a class mean scores 0 (the maximum).
    inputs = keras.Input((1, 2, 1))
    flat = keras.layers.Flatten()(inputs)
    backbone = keras.Model(inputs, keras.layers.Dense(2)(flat))
    scorer = OODScorer(backbone, value_range=(-10, 10), class_means=means, precision=precision)
    points = np.array([means[0], means[1], [0.0, 3.0]], np.float32).reshape(3, 1, 2, 1)
    scores = scorer.arrays(points, ["mahalanobis"])["mahalanobis"]
    np.testing.assert_allclose(scores[:2], 0.0, atol=1e-4)
    assert scores[2] < -20  # 3 std in the narrow direction: about -(3 * 2)^2 = -36 plus the x offset


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


@pytest.mark.parametrize("kind", sorted(outliers.KINDS))
def test_made_images_keep_shape_and_range_are_seeded_and_change_the_images(kind):
    images = np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 1)).astype(np.float32)
    out = outliers.make(kind, images, seed=3)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6 and not np.allclose(out, images)
    np.testing.assert_array_equal(out, outliers.make(kind, images, seed=3))
    assert kind in names.OUTLIER_KINDS + names.ACCEPTED_SHIFTS


def test_made_images_do_what_they_say():
    rng = np.random.default_rng(0)
    images = -np.ones((4, 16, 16, 1), np.float32)
    images[:, 4:12, 4:12] = 1.0  # a bright square on a dark background
    outlined = outliers.make("outlined", images)
    assert outlined[:, 8, 8].max() == -1.0 and outlined[:, 4, 8].min() > 0.0  # flat inside, bright on edges
    moved = outliers.make("translated", images, seed=1)
    assert np.all(np.sort(moved.reshape(4, -1), axis=1) == np.sort(images.reshape(4, -1), axis=1))
    assert not np.array_equal(moved, images)
    mosaic = outliers.make("mosaic", images)
    np.testing.assert_allclose(mosaic[:, :8, :8, 0], images[:, ::2, ::2, 0])  # the image at half scale, top left
    low = outliers.make("low_contrast", rng.uniform(-1, 1, (3, 8, 8, 1)))
    assert np.abs(low).max() <= 0.3 + 1e-6
    with pytest.raises(ValueError, match="Unknown outlier or shift kind 'nope'"):
        outliers.make("nope", images)
    with pytest.raises(ValueError, match="must return finite images of shape"):
        outliers.make("mine", images, function=lambda x, value_range, seed: x[:1])
    with pytest.raises(ValueError, match="Unknown outlier kind 'nope'"):
        outliers.resolve(["inverted", "nope"], role="outlier")
    with pytest.raises(ValueError, match="given twice"):
        outliers.resolve(["inverted", "inverted"], role="outlier")


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


def test_selection_sees_only_the_validation_images_and_what_it_makes_from_them(tmp_path):
    from jem_tf.evaluation import evaluate_ood

    rng = np.random.default_rng(0)
    backbone = gaussian_backbone()
    validation = rng.normal(0, 0.5, (40, 4, 4, 1)).astype(np.float32)
    test = rng.normal(0, 0.5, (30, 4, 4, 1)).astype(np.float32)
    ood_sets = {"wide": rng.normal(0, 2.0, (30, 4, 4, 1)).astype(np.float32)}
    scorer = SpyScorer(backbone, value_range=(-4.0, 4.0))
    detector, report = ood.select_detector(scorer, validation, seed=0)
    kinds = names.OUTLIER_KINDS + names.ACCEPTED_SHIFTS
    made = [outliers.make(kind, validation, value_range=(-4.0, 4.0), seed=1 + i) for i, kind in enumerate(kinds)]
    allowed = _rows(validation).union(*(_rows(m) for m in made))
    assert all(_rows(batch) <= allowed for batch in scorer.seen)
    assert report["chosen"] == detector.name and report["outlier_kinds"] == list(names.OUTLIER_KINDS)
    assert report["accepted_shifts"] == list(names.ACCEPTED_SHIFTS)

    # Inside the evaluation, the selection gets the validation images only: changing the test images and the
    # OOD sets does not change the choice or its threshold; the evaluation then reports it on those sets.
    class FakeModel:
        value_range = (-4.0, 4.0)

    FakeModel.backbone = backbone
    chosen = []
    for shift in (0.0, 1.0):
        spy = SpyScorer(backbone, value_range=(-4.0, 4.0))
        result = evaluate_ood(FakeModel(), test + shift, {k: v + shift for k, v in ood_sets.items()},
                              out_dir=str(tmp_path), scorer=spy, val_images=validation)
        chosen.append((result["detector"]["chosen"], result["detector"]["detector"]["threshold"]))
        selection_batches = spy.seen[:1 + len(kinds)]
        assert all(_rows(batch) <= allowed for batch in selection_batches)
        assert result["detector"]["chosen"] in result["metrics"]
    assert chosen[0] == chosen[1]


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
