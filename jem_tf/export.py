"""Command line: ``python -m jem_tf.export --model WORKDIR|FILE.keras --export-dir DIR [--version N] ...``.

Exports a trained JEM as a SavedModel for TensorFlow Serving to ``DIR/<version>/`` (see
:mod:`jem_tf.serving` for the signatures), with the OOD threshold calibrated on the run's validation
split.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from jem_tf.cli import OneLineErrorParser
from jem_tf.data import DATASETS, PREPROCESSING, DataNotFoundError
from jem_tf.run import held_out_split, load_trained_model
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
        images, _, _ = held_out_split(dataset, config=config, data_dir=args.data_dir)
        path = export_saved_model(model, args.export_dir, version=args.version, calibration_images=images,
                                  tpr=args.tpr, max_num_samples=args.max_num_samples, max_n_steps=args.max_n_steps,
                                  preprocessing=PREPROCESSING.get(dataset, ""), dataset=dataset)
    except (ValueError, DataNotFoundError) as error:
        parser.error(str(error))
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
