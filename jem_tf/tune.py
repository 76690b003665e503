"""Command line: ``python -m jem_tf.tune --recipe NAME [--tuner random|hyperband|bayesian|grid] [--max-trials N]
[--directory DIR] [--FIELD VALUE ...]``: a keras-tuner search over JEM's sensitive settings."""

from __future__ import annotations

import json
from typing import List, Optional

from jem_tf.choices import TUNERS
from jem_tf.choices import TUNING_OBJECTIVES as OBJECTIVES
from jem_tf.cli import (
    INTERRUPTS,
    OneLineErrorParser,
    add_recipe_arguments,
    config_from_args,
    exit_process,
    recipe_name,
    run_command,
)
from jem_tf.errors import UsageError


def build_parser() -> OneLineErrorParser:
    """The command's flags (no TensorFlow, no keras-tuner needed to build them)."""
    parser = OneLineErrorParser(prog="python -m jem_tf.tune",
                                description="Hyperparameter search for a JEM recipe with keras-tuner.")
    parser.add_argument("--tuner", choices=TUNERS, default="random")
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--directory", default=None, help="search directory (default: runs/tune-<recipe>)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="val_accuracy",
                        help="val_accuracy, or combined = val_accuracy + OOD AUROC of log p(x) vs uniform noise")
    parser.add_argument("--space", default=None,
                        help="JSON file of search-space overrides: {name: {type, min, max[, sampling|step]} | "
                             "{type: choice, values: [...]} | null}")
    parser.add_argument("--fix", default="", help="comma-separated hyperparameters to keep at the recipe's value")
    parser.add_argument("--save-buffers", action="store_true", help="keep each trial's replay buffer in its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming the search")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=0)
    add_recipe_arguments(parser)
    return parser


def read_space(path: str):
    """The search-space overrides in the JSON file ``--space PATH``; :class:`~jem_tf.errors.UsageError` when it
    cannot be read or is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UsageError(str(error)) from error


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command as ``argv`` says; returns the exit code: 0, 1 (disk full), 2 (bad input), 130 (Ctrl-C)."""
    return run_command("python -m jem_tf.tune", lambda: _main(argv),
                       interrupted=lambda: "rerun the same command to resume the search")


def _main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # After the flags: keras-tuner (the `tune` extra: a one-line error naming it when missing) and TensorFlow.
    from jem_tf.run.splits import load_run_dataset
    from jem_tf.run.workdir import check_output_dir
    from jem_tf.training.tuning import run_search, search_space

    config = config_from_args(parser, args)
    if args.max_trials < 1:
        parser.error(f"--max-trials must be >= 1; received {args.max_trials}")
    directory = args.directory or f"runs/tune-{recipe_name(args.recipe)}"
    with parser.usage_errors():
        check_output_dir(directory, "--directory")
        overrides = read_space(args.space) if args.space else None
        space = search_space(overrides, fixed=[n.strip() for n in args.fix.split(",") if n.strip()])
        data = load_run_dataset(config=config, download=config.download)
        summary = run_search(config, data, directory=directory, kind=args.tuner, max_trials=args.max_trials,
                             objective=args.objective, space=space, save_buffers=args.save_buffers,
                             overwrite=args.overwrite, verbose=args.verbose,
                             stop_check=INTERRUPTS.raise_if_interrupted)
    best = summary["best"]
    print(f"{summary['num_trials']} trials ({summary['num_failed']} failed) in {summary['wall_seconds']:.0f} s; "
          + (f"best {summary['objective']} = {best['score']:.4f} with {best['hyperparameters']}; "
             f"recipe: {directory}/best_recipe.json" if best else "no trial completed"))
    return 0 if best else 1


if __name__ == "__main__":
    exit_process(main())
