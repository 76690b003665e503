"""Command line: ``python -m jem_tf.evaluate --model PATH --out DIR [--modes MODE ...] [--FLAG VALUE ...]``.

Evaluates a trained model (a training work directory, whose dataset, seed and validation split are used,
or a ``.keras`` file with ``--dataset``) with :func:`jem_tf.evaluation.evaluate`, writes ``DIR/report.json``
and PNG figures, and prints a summary. The modes are described in :mod:`jem_tf.evaluation`; their settings
are the fields of :class:`jem_tf.evaluation.EvaluationConfig`, with the same defaults, one flag each
(``--sample-steps 50``; ``pgd_eps`` is ``--pgd-linf-eps`` and ``--pgd-l2-eps``). Bad flags or values (a
:class:`~jem_tf.errors.UsageError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import List, Optional

from jem_tf.choices import DATASETS, EVALUATION_ONLY_DATASETS, REFINEMENT_SOURCES
from jem_tf.choices import EVALUATION_MODES as MODES
from jem_tf.cli import OneLineErrorParser, dataset_argument, exit_process, import_library, run_command
from jem_tf.errors import UsageError, as_usage_error
from jem_tf.evaluation.settings import DEFAULT_PGD_EPS, INCEPTION, SYNTHETIC_OOD, EvaluationConfig


def build_parser() -> OneLineErrorParser:
    defaults = EvaluationConfig()
    parser = OneLineErrorParser(prog="python -m jem_tf.evaluate",
                                description="Evaluate a trained JEM: accuracy, calibration, OOD detection, samples, "
                                            "Fréchet distance and adversarial robustness.")
    parser.add_argument("--model", required=True, help="training work directory or .keras file")
    parser.add_argument("--dataset", type=dataset_argument(), default=None, metavar="NAME",
                        help=f"in-distribution dataset (default: the run's): {', '.join(DATASETS)}, another tfds "
                             "image classification name, a .npz file or an image folder")
    parser.add_argument("--data-dir", default=None, help="data directory of --dataset")
    parser.add_argument("--ood", nargs="+", default=list(SYNTHETIC_OOD), metavar="NAME",
                        type=dataset_argument(extra=SYNTHETIC_OOD),
                        help=f"OOD sets: {', '.join(SYNTHETIC_OOD + EVALUATION_ONLY_DATASETS + DATASETS)}, another "
                             "tfds image classification name, a .npz file (its test split), or a folder of images "
                             "(an image folder's test/, class subfolders, or images; resized to the model's size)")
    parser.add_argument("--ood-data-dir", default=None, help="data directory of the named OOD datasets")
    parser.add_argument("--max-ood-images", type=int, default=None, help="cap on images per OOD set")
    parser.add_argument("--detectors", nargs="+", default=None, metavar="NAME",
                        help="mode ood: report and select among these candidate detectors only (e.g. log_px: "
                             "compare recipes by their density, at a fraction of the full selection's cost; "
                             "default: all, jem_tf.ood.default_candidates)")
    parser.add_argument("--out", required=True, help="output directory for report.json and PNG figures")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(defaults.modes), metavar="MODE",
                        help=f"some of {', '.join(MODES)} (default: {' '.join(defaults.modes)})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-test-images", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--input-noise-std", type=float, default=defaults.input_noise_std,
                        help="Gaussian noise added to evaluated inputs (default 0: none, unlike the reference code)")
    parser.add_argument("--num-bins", type=int, default=defaults.num_bins, help="calibration bins (default 20)")
    parser.add_argument("--temperature-scaling", choices=["true", "false"],
                        default=str(defaults.temperature_scaling).lower())
    parser.add_argument("--refinement", choices=REFINEMENT_SOURCES, default=defaults.refinement,
                        help="refinement settings of modes accuracy and robustness: model (saved with the model; "
                             "chosen on the validation split when it has none), choose (chosen anew on the "
                             "validation split), sampler (the training sampler's, the old behaviour)")
    parser.add_argument("--refine-steps", type=int, nargs="+", default=None,
                        help="SGLD refinement steps (accuracy; default: the refinement settings')")
    parser.add_argument("--sample-steps", type=int, default=defaults.sample_steps, help="SGLD steps from fresh noise")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples)
    parser.add_argument("--long-chain-steps", type=int, default=defaults.long_chain_steps)
    parser.add_argument("--feature-model", default=None,
                        help=f"Fréchet features: a work directory / .keras classifier, or {INCEPTION}")
    parser.add_argument("--feature-layer", default=None, help="layer of --feature-model (default: penultimate)")
    parser.add_argument("--inception-weights", default=None, help=f"local weights file for {INCEPTION}")
    parser.add_argument("--frechet-images", type=int, default=defaults.frechet_images)
    parser.add_argument("--pgd-linf-eps", type=float, nargs="*", default=list(DEFAULT_PGD_EPS["linf"]),
                        help="L-inf budgets as fractions of the pixel range")
    parser.add_argument("--pgd-l2-eps", type=float, nargs="*", default=list(DEFAULT_PGD_EPS["l2"]),
                        help="L2 budgets in units of the pixel range")
    parser.add_argument("--pgd-steps", type=int, default=defaults.pgd_steps)
    parser.add_argument("--robustness-examples", type=int, default=defaults.robustness_examples)
    parser.add_argument("--robustness-refine-steps", type=int, default=None,
                        help="refinement steps of attacked images (default: the refinement settings')")
    parser.add_argument("--bpda-eot-samples", type=int, default=defaults.bpda_eot_samples,
                        help="noise draws per step of the adaptive BPDA attack when the refinement is random")
    return parser


def _check_ranges(parser: OneLineErrorParser, args: argparse.Namespace) -> None:
    """Exits with a one-line error (code 2) on the first value out of its range."""
    for name in ("batch_size", "num_bins", "sample_steps", "num_samples", "frechet_images", "pgd_steps",
                 "robustness_examples", "max_test_images", "max_ood_images", "bpda_eot_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; received {value}")
    for name in ("long_chain_steps", "robustness_refine_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0; received {getattr(args, name)}")
    if any(k < 0 for k in args.refine_steps or ()) or args.input_noise_std < 0:
        parser.error("--refine-steps and --input-noise-std must be >= 0")
    if any(e < 0 for e in args.pgd_linf_eps + args.pgd_l2_eps):
        parser.error("PGD budgets must be >= 0")


def evaluation_config_from_args(args: argparse.Namespace) -> EvaluationConfig:
    """The :class:`EvaluationConfig` that parsed flags ask for."""
    return EvaluationConfig(
        modes=tuple(args.modes), seed=args.seed, input_noise_std=args.input_noise_std, num_bins=args.num_bins,
        temperature_scaling=args.temperature_scaling == "true", refinement=args.refinement,
        refine_steps=None if args.refine_steps is None else tuple(args.refine_steps),
        sample_steps=args.sample_steps, num_samples=args.num_samples, long_chain_steps=args.long_chain_steps,
        frechet_images=args.frechet_images, pgd_eps={"linf": tuple(args.pgd_linf_eps), "l2": tuple(args.pgd_l2_eps)},
        pgd_steps=args.pgd_steps, robustness_examples=args.robustness_examples,
        robustness_refine_steps=args.robustness_refine_steps, bpda_eot_samples=args.bpda_eot_samples,
        detectors=None if args.detectors is None else tuple(args.detectors), batch_size=args.batch_size)


def _load_ood_sets(args: argparse.Namespace, x_test, model) -> dict:
    """The ``--ood`` sets, each checked against the model's image shape before any evaluation runs."""
    from jem_tf.evaluation import load_ood_sets

    with as_usage_error():  # data sets the user names: a .npz file's checks raise a plain ValueError
        ood_sets = load_ood_sets(args.ood, x_test, value_range=model.value_range, seed=args.seed,
                                 data_dir=args.ood_data_dir, max_images=args.max_ood_images)
    for name, images in ood_sets.items():
        if tuple(images.shape[1:]) != tuple(model.image_shape):
            raise UsageError(f"OOD set {name!r} has images of shape {tuple(images.shape[1:])}; the model takes "
                             f"{tuple(model.image_shape)}.")
    return ood_sets


def _named_detectors(parser: OneLineErrorParser, config: EvaluationConfig) -> list:
    """The candidates ``--detectors`` names (empty without the flag); a one-line error for a name that is none."""
    from jem_tf.ood import named_candidates

    if config.detectors is None:
        return []
    try:
        return named_candidates(config.detectors)
    except ValueError as error:
        parser.error(f"--detectors: {error}")


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command as ``argv`` says; returns the exit code: 0, 1 (disk full), 2 (bad input), 130 (Ctrl-C)."""
    return run_command("python -m jem_tf.evaluate", lambda: _main(argv),
                       interrupted=lambda: "the report was not written")


def _main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_ranges(parser, args)
    config = evaluation_config_from_args(args)
    started = time.perf_counter()
    # After the flags: TensorFlow, the library (what saved models name) and the evaluation's modules.
    import_library()
    from jem_tf.evaluation import REPORT_FILE, evaluate, load_feature_network, summary_lines
    from jem_tf.ood import origin
    from jem_tf.run.model_files import load_trained_model, source_classifier_network
    from jem_tf.run.splits import dataset_splits, load_run_dataset
    from jem_tf.run.workdir import check_output_dir, load_run_metrics

    with parser.usage_errors():
        check_output_dir(args.out, "--out")
        detectors = _named_detectors(parser, config)
        model, train_config = load_trained_model(args.model)
        training = load_run_metrics(args.model) if os.path.isdir(args.model) else None
        dataset = args.dataset or (train_config.dataset if train_config else None)
        if dataset is None:
            parser.error("--dataset is needed with a bare .keras file")
        data = load_run_dataset(dataset, config=train_config, data_dir=args.data_dir)
        splits = dataset_splits(dataset, config=train_config, data=data)
        if config.refinement == "choose" and splits.validation is None:
            parser.error(f"--refinement choose picks the settings on a validation split, and {args.model!r} has none "
                         "(a bare .keras file, or a run without one); pass --refinement model or sampler")
        x_val = y_val = x_train = y_train = None
        if splits.validation is not None:  # temperatures and OOD detectors are never fitted on test data
            x_val, y_val = splits.validation
            # The images the run trained on, with only the labels it used: the Mahalanobis statistics of mode ood.
            x_train, y_train = splits.labelled
        x_test, y_test = splits.test.images[:args.max_test_images], splits.test.labels[:args.max_test_images]
        ood_sets = _load_ood_sets(args, x_test, model) if "ood" in config.modes else {}
        network = None
        if "frechet" in config.modes:
            if args.feature_model is None:
                parser.error(f"--modes frechet needs --feature-model (a classifier's work directory / .keras file, "
                             f"or {INCEPTION} with --inception-weights); no FID is reported with another network")
            with as_usage_error():  # the file --feature-model names, read and checked against the images
                network = load_feature_network(args.feature_model, image_shape=model.image_shape,
                                               layer=args.feature_layer, inception_weights=args.inception_weights,
                                               batch_size=args.batch_size)
        source_network = None  # a conversion's detector may also be its classifier's own (jem_tf.ood.detectors)
        if "ood" in config.modes:
            source_network = source_classifier_network(train_config, image_shape=model.image_shape,
                                                       num_classes=model.num_classes)
        needs_source = [d.name for d in detectors if origin(d) != "this model"]
        if needs_source and source_network is None:
            parser.error(f"--detectors {' '.join(needs_source)}: the source classifier's detectors need a "
                         f"converted run (trained with --init-from); {args.model!r} is not one")
    report = evaluate(
        model, test_images=x_test, test_labels=y_test, out_dir=args.out, config=config, val_images=x_val,
        val_labels=y_val, train_images=x_train, train_labels=y_train, ood_sets=ood_sets, feature_network=network,
        source_network=source_network,
        model_info={"path": os.path.abspath(args.model), "dataset": dataset,
                    "train_config": dataclasses.asdict(train_config) if train_config else None,
                    "training": training})
    for line in summary_lines(report):
        print(line)
    print(f"wrote {os.path.join(args.out, REPORT_FILE)} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    exit_process(main())
