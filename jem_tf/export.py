"""Command line: ``python -m jem_tf.export --model WORKDIR|FILE.keras --export-dir DIR [--version N] ...``.

Exports a trained JEM as a SavedModel for TensorFlow Serving to ``DIR/<version>/`` (see
:mod:`jem_tf.serving` for the signatures), with the OOD detector (:mod:`jem_tf.ood`) chosen and
calibrated on the run's validation split (or, only when asked with ``--calibration-split test``, on the
test split).
"""

from __future__ import annotations

import sys
from typing import List, Optional

from jem_tf.cli import OneLineErrorParser
from jem_tf.data import DATASETS, PREPROCESSING, DataNotFoundError
from jem_tf.ood import fit_ood_detector
from jem_tf.run import CALIBRATION_SPLITS, load_run_dataset, load_trained_model, ood_calibration_data
from jem_tf.serving import export_saved_model


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="python -m jem_tf.export",
                                description="Export a trained JEM as a SavedModel for TensorFlow Serving.")
    parser.add_argument("--model", required=True, help="training work directory or .keras file")
    parser.add_argument("--export-dir", required=True, help="TF Serving model base path; writes EXPORT_DIR/<version>/")
    parser.add_argument("--version", type=int, default=None, help="integer version (default: next free)")
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="in-distribution data for OOD calibration (default: the run's dataset)")
    parser.add_argument("--data-dir", default=None, help="data directory of --dataset")
    parser.add_argument("--tpr", type=float, default=0.95, help="fraction of held-out data called in-distribution")
    parser.add_argument("--calibration-split", choices=CALIBRATION_SPLITS, default="validation",
                        help="where the OOD detector is chosen and calibrated: the run's validation split (default; an "
                             "error when the run has none) or, explicitly, the test split")
    parser.add_argument("--ood-detector", choices=("select", "log_px"), default="select",
                        help="select: the best candidate on validation data and outliers made from it (jem_tf.ood); "
                             "log_px: the JEM's log p(x) alone")
    parser.add_argument("--seed", type=int, default=0, help="seed of the outliers made for the selection")
    parser.add_argument("--max-num-samples", type=int, default=256, help="upper bound of sample's num_samples")
    parser.add_argument("--max-n-steps", type=int, default=1000, help="upper bound of sample's n_steps")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model, config = load_trained_model(args.model)
        dataset = args.dataset or (config.dataset if config else None)
        if dataset is None:
            parser.error("--dataset is needed to calibrate the OOD threshold of a bare .keras file")
        if not 0.0 < args.tpr <= 1.0:
            parser.error(f"--tpr must be in (0, 1]; received {args.tpr}")
        data = load_run_dataset(dataset, config=config, data_dir=args.data_dir)
        calibration, train = ood_calibration_data(dataset, config=config, data=data,
                                                  calibration_split=args.calibration_split)
        ood = fit_ood_detector(model, calibration.images, calibration_split=args.calibration_split,
                               calibration_labels=calibration.labels, train_images=train.images,
                               train_labels=train.labels, select=args.ood_detector == "select", tpr=args.tpr,
                               seed=args.seed)
        path = export_saved_model(model, args.export_dir, version=args.version, ood=ood,
                                  max_num_samples=args.max_num_samples, max_n_steps=args.max_n_steps,
                                  preprocessing=PREPROCESSING.get(dataset, ""), dataset=dataset)
    except (ValueError, DataNotFoundError) as error:
        parser.error(str(error))
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
