"""The whole evaluation: one entry per mode in :data:`MODE_TABLE` (their settings:
:class:`~jem_tf.evaluation.settings.EvaluationConfig`), and :func:`evaluate`, which runs the modes in the order of
:data:`MODES` and writes ``report.json``."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import keras
import numpy as np

from jem_tf.choices import EVALUATION_MODES as MODES
from jem_tf.evaluation.classification import evaluate_accuracy, evaluate_calibration
from jem_tf.evaluation.frechet import FeatureNetwork, evaluate_frechet
from jem_tf.evaluation.ood_benchmark import evaluate_ood
from jem_tf.evaluation.refinement_choice import resolve_refinement
from jem_tf.evaluation.robustness import evaluate_robustness
from jem_tf.evaluation.samples import evaluate_samples
from jem_tf.evaluation.settings import DEFAULT_PGD_EPS, EvaluationConfig
from jem_tf.files import atomic_write_json
from jem_tf.model.jem import JEM
from jem_tf.model.refinement import RefinementSettings
from jem_tf.ood import OODScorer, named_candidates, origin

REPORT_FILE = "report.json"
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModeContext:
    """What a mode of :func:`evaluate` works on: the model, the inputs (after the report's transforms), the
    settings, the output directory, and the report so far (the modes before it in ``MODES``)."""

    model: JEM
    config: EvaluationConfig
    out_dir: str
    test_images: np.ndarray
    test_labels: np.ndarray
    val_images: Optional[np.ndarray]
    val_labels: Optional[np.ndarray]
    train_images: Optional[np.ndarray]
    train_labels: Optional[np.ndarray]
    ood_sets: Mapping[str, np.ndarray]
    feature_network: Optional[FeatureNetwork]
    source_network: Optional[keras.Model]
    refinement: RefinementSettings
    report: dict


def _accuracy(run: ModeContext) -> dict:
    c = run.config
    return evaluate_accuracy(run.model, run.test_images, run.test_labels, refine_steps=c.refine_steps,
                             refinement=run.refinement, seed=c.seed, batch_size=c.batch_size)


def _calibration(run: ModeContext) -> dict:
    c = run.config
    return evaluate_calibration(run.model, run.test_images, run.test_labels, out_dir=run.out_dir,
                                val_images=run.val_images, val_labels=run.val_labels, num_bins=c.num_bins,
                                temperature_scaling=c.temperature_scaling, batch_size=c.batch_size)


def _ood(run: ModeContext) -> dict:
    c = run.config
    # Temperature from the validation split (the one mode calibration fitted, when it ran), Mahalanobis
    # statistics from the training split (when given).
    fitted = run.report.get("calibration", {}).get("temperature_scaled", {}).get("temperature")
    # Named detectors: only what they read is fitted (the training split's features, the source classifier).
    candidates = None if c.detectors is None else named_candidates(c.detectors)
    mahalanobis = candidates is None or any(name.endswith("mahalanobis") for d in candidates for name in d.components)
    source = candidates is None or any(origin(d) != "this model" for d in candidates)
    scorer = OODScorer.fit(run.model, train_images=run.train_images if mahalanobis else None,
                           train_labels=run.train_labels, val_images=run.val_images, val_labels=run.val_labels,
                           temperature=fitted, batch_size=c.batch_size,
                           source_network=run.source_network if source else None)
    temperature_source = "1 (no validation split to fit it on)"
    if run.val_images is not None and len(run.val_images) > 0:
        temperature_source = "fitted on the validation split"
    return evaluate_ood(run.model, run.test_images, run.ood_sets, out_dir=run.out_dir, scorer=scorer,
                        val_images=run.val_images, candidates=candidates, temperature_source=temperature_source,
                        seed=c.seed, batch_size=c.batch_size)


def _samples(run: ModeContext) -> dict:
    c = run.config
    return evaluate_samples(run.model, out_dir=run.out_dir, reference_images=run.test_images[:1000],
                            num_samples=c.num_samples, sample_steps=c.sample_steps,
                            long_chain_steps=c.long_chain_steps, seed=c.seed)


def _frechet(run: ModeContext) -> dict:
    c = run.config
    return evaluate_frechet(run.model, run.test_images, network=run.feature_network, held_out_images=run.val_images,
                            num_images=c.frechet_images, sample_steps=c.sample_steps, seed=c.seed,
                            batch_size=c.batch_size)


def _robustness(run: ModeContext) -> dict:
    c = run.config
    return evaluate_robustness(run.model, run.test_images, run.test_labels, eps=c.pgd_eps or DEFAULT_PGD_EPS,
                               steps=c.pgd_steps,
                               refinement=run.refinement.replace(n_steps=c.robustness_refine_steps),
                               max_examples=c.robustness_examples, eot_samples=c.bpda_eot_samples, seed=c.seed,
                               batch_size=c.batch_size)


# Each mode's report section from its context; `evaluate` runs them in the order of MODES.
MODE_TABLE: Dict[str, Callable[[ModeContext], dict]] = {
    "accuracy": _accuracy,
    "calibration": _calibration,
    "ood": _ood,
    "samples": _samples,
    "frechet": _frechet,
    "robustness": _robustness,
}


def _add_input_noise(test_images: np.ndarray, ood_sets: Dict[str, np.ndarray], config: EvaluationConfig
                     ) -> Tuple[np.ndarray, Dict[str, np.ndarray], List[str]]:
    """``(test_images, ood_sets, transforms)``: the inputs with ``config.input_noise_std`` Gaussian noise
    (unchanged when it is 0) and the report's description of what was done to them."""
    if config.input_noise_std <= 0:
        return test_images, ood_sets, ["none: inputs used as loaded (training-time data noise is off)"]
    rng = np.random.default_rng(config.seed)

    def noisy(x):
        return (x + rng.normal(0.0, config.input_noise_std, size=x.shape)).astype(np.float32)

    test_images = noisy(test_images)
    ood_sets = {name: noisy(np.asarray(x, np.float32)) for name, x in ood_sets.items()}
    return test_images, ood_sets, [f"gaussian noise std {config.input_noise_std} added to test and OOD inputs "
                                   f"(seed {config.seed})"]


def evaluate(model: JEM, *, test_images: np.ndarray, test_labels: np.ndarray, out_dir: str,
             config: Optional[EvaluationConfig] = None, val_images: Optional[np.ndarray] = None,
             val_labels: Optional[np.ndarray] = None, train_images: Optional[np.ndarray] = None,
             train_labels: Optional[np.ndarray] = None, ood_sets: Optional[Mapping[str, np.ndarray]] = None,
             feature_network: Optional[FeatureNetwork] = None, model_info: Optional[dict] = None,
             source_network: Optional[keras.Model] = None, **settings) -> dict:
    """Runs the configured modes and writes ``out_dir/report.json`` and the figures; returns the report.

    Args:
        model: A trained :class:`JEM`.
        test_images, test_labels: In-distribution test data in the model's value range.
        out_dir: Output directory (created).
        config: The settings (default: :class:`EvaluationConfig`'s defaults).
        val_images, val_labels: Held-out data for temperature scaling and for selecting the OOD detector
            (never the test split).
        train_images, train_labels: The run's training split, for the Mahalanobis statistics of mode ``ood``
            (optional: without it that score is left out).
        ood_sets: ``{name: images}`` out-of-distribution sets (mode ``ood``); see
            :func:`~jem_tf.evaluation.ood_benchmark.synthetic_ood_images`.
        feature_network: Needed by mode ``frechet``; see :func:`~jem_tf.evaluation.frechet.load_feature_network`.
        model_info: Entries for the report's ``model`` section (its path, dataset, ...).
        source_network: For a converted model, its classifier's logits network before the fine-tune
            (:func:`jem_tf.run.model_files.source_classifier_network`): mode ``ood``'s candidates include the
            classifier's own (``source_...``).
        **settings: :class:`EvaluationConfig` fields that override ``config`` (``modes=("accuracy",)``,
            ``seed=1``, ...); unknown names raise ``ValueError``.
    """
    config = (config if config is not None else EvaluationConfig()).replace(**settings).validate()
    test_images = np.asarray(test_images, np.float32)
    if tuple(test_images.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"Test images have shape {tuple(test_images.shape[1:])}; the model takes "
                         f"{tuple(model.image_shape)}.")
    if "ood" in config.modes and not ood_sets:
        raise ValueError("Mode 'ood' needs `ood_sets` (e.g. {'uniform': synthetic_ood_images('uniform', x)}).")
    if "frechet" in config.modes and feature_network is None:
        raise ValueError("Mode 'frechet' needs a feature network (--feature-model PATH or inception_v3 with "
                         "--inception-weights FILE); there is no default, so no FID is reported under another name.")
    os.makedirs(out_dir, exist_ok=True)
    test_images, ood_sets, transforms = _add_input_noise(test_images, dict(ood_sets or {}), config)

    report = {"schema_version": SCHEMA_VERSION, "model": dict(model_info or {}),
              "settings": {"modes": list(config.modes), "seed": config.seed, "transforms": transforms,
                           "batch_size": config.batch_size, "num_test": int(len(test_labels)),
                           "value_range": list(model.value_range)},
              "timing_s": {}}
    refinement = model.refinement_settings
    if "accuracy" in config.modes or "robustness" in config.modes:
        # Chosen on the validation split when the model has none saved (never on test images).
        refinement = resolve_refinement(model, config.refinement, val_images=val_images, val_labels=val_labels,
                                        seed=config.seed, batch_size=config.batch_size)
        report["settings"]["refinement"] = refinement.describe()
    report["model"].update({"num_params": int(model.backbone.count_params()), "image_shape": list(model.image_shape),
                            "num_classes": model.num_classes, "px_weight": model.px_weight,
                            "sampler": model.sampler.get_config(),
                            "refinement": None if model.refinement is None else model.refinement.describe()})
    run = ModeContext(model=model, config=config, out_dir=out_dir, test_images=test_images, test_labels=test_labels,
                      val_images=val_images, val_labels=val_labels, train_images=train_images,
                      train_labels=train_labels, ood_sets=ood_sets,
                      feature_network=feature_network, source_network=source_network, refinement=refinement,
                      report=report)
    for mode in MODES:
        if mode not in config.modes:
            continue
        start = time.perf_counter()
        report[mode] = MODE_TABLE[mode](run)
        report["timing_s"][mode] = round(time.perf_counter() - start, 2)
    atomic_write_json(os.path.join(out_dir, REPORT_FILE), report)
    return report


def summary_lines(report: dict) -> List[str]:
    """The report's headline numbers, one line per mode (two for calibration with temperature scaling,
    one per score for OOD); the samples mode has none."""
    lines = []
    if "accuracy" in report:
        refined = ", ".join(f"{k} steps {v:.4f}" for k, v in report["accuracy"]["accuracy_after_refinement"].items())
        lines.append(f"accuracy {report['accuracy']['accuracy']:.4f}" + (f" (refined: {refined})" if refined else ""))
    if "calibration" in report:
        c = report["calibration"]["uncalibrated"]
        lines.append(f"ECE {c['ece']:.4f}  MCE {c['mce']:.4f}  NLL {c['nll']:.4f}  Brier {c['brier']:.4f}")
        if "temperature_scaled" in report["calibration"]:
            t = report["calibration"]["temperature_scaled"]
            lines.append(f"temperature {t['temperature']:.3f}: ECE {t['ece']:.4f}  NLL {t['nll']:.4f}")
    if "ood" in report:
        chosen = report["ood"].get("detector", {}).get("chosen")
        if chosen is not None:
            selection = report["ood"]["detector"]["selection"]
            row = selection["candidates"][chosen]
            accepted = "" if row["mean_accepted"] is None else (
                f"; accepts {row['mean_accepted']:.0%} of the accepted shifts "
                f"({', '.join(selection['accepted_shifts'])})")
            lines.append(f"OOD detector {chosen}: worst AUROC {row['worst']:.4f} over outliers made from the "
                         f"validation split ({', '.join(selection['outlier_kinds'])}){accepted}")
        for score, per_set in report["ood"]["metrics"].items():
            mark = " (chosen)" if score == chosen else ""
            lines.append(f"OOD AUROC [{score}]{mark} " + "  ".join(f"{n} {m['auroc']:.4f}" for n, m in per_set.items()))
    if "frechet" in report:
        name = report["frechet"]["settings"]["metric_name"]
        lines.append(f"{name} " + "  ".join(f"{k} {v[name]:.3f}" for k, v in report["frechet"]["distances"].items()))
    if "robustness" in report:
        r = report["robustness"]["settings"]["refinement"]
        lines.append(f"refinement: {r['n_steps']} steps, step {r['step_size']:g}, noise {r['noise_std']:g}, "
                     f"grad clamp {r['grad_clamp']} ({r['source']})")
        lines.append("robust accuracy (plain / refined, non-adaptive attack / refined, BPDA attack) " + "  ".join(
            f"{k} {v['accuracy']:.3f}/{v['accuracy_refined']:.3f}"
            + (f"/{v['accuracy_refined_bpda']:.3f}" if "accuracy_refined_bpda" in v else "")
            for k, v in report["robustness"].items() if k != "settings"))
    return lines
