"""Command line: ``python -m jem_tf.export --model WORKDIR|FILE.keras --export-dir DIR [--version N] ...``.

Exports a trained JEM as a SavedModel for TensorFlow Serving to ``DIR/<version>/`` (see
:mod:`jem_tf.serving` for the signatures), with the OOD detector (:mod:`jem_tf.ood`) chosen and
calibrated on the run's validation split (or, only when asked with ``--calibration-split test``, on the
test split). Bad flag values end with a one-line error (exit code 2) before anything is loaded; the bounds of the
``sample`` signature that depend on the model (``--max-num-samples``: at most 1 GiB of float32 samples per
request; ``--max-step-size``/``--max-noise-std``: not below the trained sampler's) right after the model, before
any data. Bad input found later (a :class:`~jem_tf.errors.UsageError`) is one line too; any other error keeps its
traceback (exit code 1).
"""

from __future__ import annotations

import math
import os
from typing import List, Optional

from jem_tf import choices as names
from jem_tf.choices import CALIBRATION_SPLITS, DATASETS, DEFAULT_MAX_BATCH_SIZE, MAX_N_STEPS_LIMIT, SERVING_PRECISIONS
from jem_tf.cli import OneLineErrorParser, dataset_argument, exit_process, import_library, run_command
from jem_tf.errors import UsageError

# The made outlier and shift kinds a flag can name (jem_tf.ood.outliers.KINDS).
OUTLIER_AND_SHIFT_KINDS = sorted(names.OUTLIER_KINDS + names.ACCEPTED_SHIFTS)

# The sample signature's bounds: library keyword -> flag.
SAMPLE_LIMIT_FLAGS = {"max_num_samples": "--max-num-samples", "max_n_steps": "--max-n-steps",
                      "max_step_size": "--max-step-size", "max_noise_std": "--max-noise-std"}


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="python -m jem_tf.export",
                                description="Export a trained JEM as a SavedModel for TensorFlow Serving.")
    parser.add_argument("--model", required=True, help="training work directory or .keras file")
    parser.add_argument("--export-dir", required=True, help="TF Serving model base path; writes EXPORT_DIR/<version>/")
    parser.add_argument("--version", type=int, default=None, help="integer version (default: next free)")
    parser.add_argument("--dataset", type=dataset_argument(training=True), default=None, metavar="NAME",
                        help="in-distribution data for OOD calibration (default: the run's dataset): "
                             f"{', '.join(DATASETS)}, another tfds image classification name, or a .npz file")
    parser.add_argument("--data-dir", default=None, help="data directory of --dataset")
    parser.add_argument("--tpr", type=float, default=0.95, help="fraction of held-out data called in-distribution")
    parser.add_argument("--calibration-split", choices=CALIBRATION_SPLITS, default="validation",
                        help="where the OOD detector is chosen and calibrated: the run's validation split (default; an "
                             "error when the run has none) or, explicitly, the test split")
    parser.add_argument("--ood-detector", choices=("select", "log_px"), default="select",
                        help="select: the best candidate on validation data and outliers made from it (jem_tf.ood); "
                             "log_px: the JEM's log p(x) alone")
    parser.add_argument("--ood-outlier-kinds", nargs="+", choices=OUTLIER_AND_SHIFT_KINDS,
                        default=list(names.OUTLIER_KINDS), metavar="KIND",
                        help="images made from the calibration split that the detector must flag; they rank the "
                             f"candidates (default: {' '.join(names.OUTLIER_KINDS)}; one of "
                             f"{', '.join(OUTLIER_AND_SHIFT_KINDS)})")
    parser.add_argument("--ood-accepted-shifts", nargs="*", choices=OUTLIER_AND_SHIFT_KINDS,
                        default=list(names.ACCEPTED_SHIFTS), metavar="KIND",
                        help="shifts the detector should accept; never counted against a candidate, reported "
                             f"(default: {' '.join(names.ACCEPTED_SHIFTS)}; none: the flag alone)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the outliers made for the selection")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="most images a classify or energy request may hold (at most 1 GiB of float32 images)")
    parser.add_argument("--max-num-samples", type=int, default=256,
                        help="upper bound of sample's num_samples (at most 1 GiB of float32 samples per request)")
    parser.add_argument("--max-n-steps", type=int, default=1000,
                        help=f"upper bound of sample's n_steps (at most {MAX_N_STEPS_LIMIT:,})")
    parser.add_argument("--max-step-size", type=float, default=None,
                        help="upper bound of sample's step_size (default: 10x the trained sampler's)")
    parser.add_argument("--max-noise-std", type=float, default=None,
                        help="upper bound of sample's noise_std (default: max(10x the trained sampler's, the width "
                             "of the model's value range))")
    parser.add_argument("--serving-precision", choices=SERVING_PRECISIONS, default="float32",
                        help="float32 (default): the served graph computes in float32 whatever the model trained in; "
                             "trained: keep the training precision (e.g. mixed bfloat16)")
    return parser


def check_flags(parser: OneLineErrorParser, args) -> None:
    """Rejects bad flag values (one-line error, exit 2) before anything is loaded."""
    if args.version is not None and args.version < 0:
        parser.error(f"--version must be >= 0; received {args.version}")
    if not 0.0 < args.tpr <= 1.0:
        parser.error(f"--tpr must be in (0, 1]; received {args.tpr}")
    for flag, kinds in (("--ood-outlier-kinds", args.ood_outlier_kinds),
                        ("--ood-accepted-shifts", args.ood_accepted_shifts)):
        repeated = sorted({kind for kind in kinds if kinds.count(kind) > 1})
        if repeated:
            parser.error(f"{flag} names {', '.join(repeated)} more than once; give each kind once")
    both = sorted(set(args.ood_outlier_kinds) & set(args.ood_accepted_shifts))
    if both:
        parser.error(f"--ood-outlier-kinds and --ood-accepted-shifts both name {', '.join(both)}; "
                     "give each kind one role")
    if args.max_num_samples < 1:
        parser.error(f"--max-num-samples must be >= 1; received {args.max_num_samples}")
    if not 1 <= args.max_n_steps <= MAX_N_STEPS_LIMIT:
        parser.error(f"--max-n-steps must be in [1, {MAX_N_STEPS_LIMIT}]; received {args.max_n_steps}")
    for flag, value in (("--max-step-size", args.max_step_size), ("--max-noise-std", args.max_noise_std)):
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} must be finite and > 0; received {value}")


def _sample_limit_kwargs(args) -> dict:
    return {name: getattr(args, name) for name in SAMPLE_LIMIT_FLAGS}


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command as ``argv`` says; returns the exit code: 0, 1 (disk full), 2 (bad input), 130 (Ctrl-C)."""
    return run_command("python -m jem_tf.export", lambda: _main(argv), interrupted=lambda: "no version was exported")


def _main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    # After the flags: TensorFlow, the library (what saved models name) and the export's modules.
    import_library()
    from jem_tf.data import preprocessing_of
    from jem_tf.ood import fit_ood_detector
    from jem_tf.run.model_files import load_trained_model, source_classifier_network
    from jem_tf.run.splits import load_run_dataset, ood_calibration_data
    from jem_tf.run.workdir import check_output_dir
    from jem_tf.serving import check_max_batch_size, export_saved_model, sample_limits, serving_model
    with parser.usage_errors():
        check_output_dir(args.export_dir, "--export-dir")
        target = None if args.version is None else os.path.join(args.export_dir, str(args.version))
        if target is not None and os.path.exists(target):  # before the work; export_saved_model checks again
            raise UsageError(f"Version {args.version} already exists at {target!r}; versions are never overwritten.")
        model, config = load_trained_model(args.model)
        try:  # the bounds that depend on the model (1 GiB of samples or images, the trained sampler), before any data
            sample_limits(model, **_sample_limit_kwargs(args))
            check_max_batch_size(model, args.max_batch_size)
        except UsageError as error:
            message = str(error)
            for name, flag in {**SAMPLE_LIMIT_FLAGS, "max_batch_size": "--max-batch-size"}.items():
                message = message.replace(f"`{name}`", flag)
            parser.error(message)
        dataset = args.dataset or (config.dataset if config else None)
        if dataset is None:
            parser.error("--dataset is needed to calibrate the OOD threshold of a bare .keras file")
        data = load_run_dataset(dataset, config=config, data_dir=args.data_dir)
        calibration, train = ood_calibration_data(dataset, config=config, data=data,
                                                  calibration_split=args.calibration_split)
    # The OOD threshold calibrated on the scores the export serves; the export gets the trained model (its metadata
    # records the training precision).
    ood = fit_ood_detector(serving_model(model, args.serving_precision), calibration.images,
                           calibration_split=args.calibration_split, calibration_labels=calibration.labels,
                           train_images=train.images, train_labels=train.labels,
                           select=args.ood_detector == "select", tpr=args.tpr, seed=args.seed,
                           outlier_kinds=args.ood_outlier_kinds, accepted_shifts=args.ood_accepted_shifts,
                           source_network=source_classifier_network(config, image_shape=model.image_shape,
                                                                    num_classes=model.num_classes))
    path = export_saved_model(model, args.export_dir, version=args.version, ood=ood,
                              preprocessing=data.preprocessing or preprocessing_of(dataset), dataset=dataset,
                              class_names=data.class_names,
                              max_batch_size=args.max_batch_size, serving_precision=args.serving_precision,
                              **_sample_limit_kwargs(args))
    print(f"exported {path} (OOD detector {ood.detector.name}, threshold {ood.detector.threshold:.4g}, "
          f"calibrated on the {args.calibration_split} split)")
    return 0


if __name__ == "__main__":
    exit_process(main())
