"""Command line: ``python -m jem_tf.train [--recipe NAME|PATH] [--FIELD VALUE ...]``.

Trains the default recipe (``digits``: scikit-learn's 8x8 digits, no download) when run without
arguments. Every field of :class:`jem_tf.run.config.TrainConfig` is a flag (``--sgld-steps 40``).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from jem_tf.cli import (
    INTERRUPTS,
    OneLineErrorParser,
    add_recipe_arguments,
    config_from_args,
    exit_process,
    recipe_name,
    run_command,
)

# The training modules (and so TensorFlow) are imported inside main(), once Ctrl-C is the command's: an interrupt
# while they import is one line and exit 130, like any other.


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="python -m jem_tf.train",
        description="Train a Joint Energy-based Model (JEM). Without arguments: the digits recipe on CPU.",
    )
    parser.add_argument("--workdir", default=None,
                        help="output directory (default: runs/<recipe name>); a finished run there is never "
                             "replaced without --overwrite, an interrupted one is resumed")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --workdir (finished or interrupted) instead of refusing/resuming")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                        help="Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch (default: 1 on a "
                             "terminal, 2 when the output goes to a file or a pipe)")
    add_recipe_arguments(parser)
    return parser


def parse_config(argv: Optional[List[str]] = None):
    """Parses ``argv`` into ``(TrainConfig, workdir, verbose)``; bad values exit with code 2."""
    config, workdir, verbose, _ = parse_args(argv)
    return config, workdir, verbose


def parse_args(argv: Optional[List[str]] = None):
    """``(TrainConfig, workdir, verbose, overwrite)`` from ``argv``; bad values exit with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    if args.workdir is not None and not args.workdir.strip():
        parser.error("--workdir must not be empty (an unset shell variable?); omit it for runs/<recipe name>")
    workdir = f"runs/{recipe_name(args.recipe)}" if args.workdir is None else args.workdir
    # A progress bar redraws itself on a terminal; in a log file it is a line per batch (hundreds of KB).
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    return config, workdir, verbose, args.overwrite


def main(argv: Optional[List[str]] = None) -> int:
    """Trains as ``argv`` says; returns the exit code: 0, 1 (diverged, disk full), 2 (bad input: a flag or a
    :class:`~jem_tf.errors.UsageError`), 130 (Ctrl-C). Any other exception propagates with its traceback."""
    workdir = None

    def body() -> int:
        nonlocal workdir
        config, workdir, verbose, overwrite = parse_args(argv)
        return _train(config, workdir, verbose, overwrite)

    def interrupted() -> str:
        if workdir is None:
            return "nothing was written"
        try:
            _, done = _backup_epochs(workdir)
        except Exception:  # interrupted while TensorFlow was being imported (a half-imported module): no run started
            return "nothing was written"
        return (f"rerun the same command to resume from epoch {done + 1}" + ("" if done else
                                                                            " (no epoch had finished)"))

    def disk_full(error) -> str:
        backup, done = _backup_epochs(workdir)
        return f"{error}; " + (f"the last good epoch ({done}) is kept in {backup}; free space and rerun the same "
                               "command to resume" if done else "free space and rerun the same command") + "."

    return run_command("python -m jem_tf.train", body, interrupted=interrupted, disk_full=disk_full)


def _backup_epochs(workdir: str):
    """``(backup directory, epochs it holds)`` of the run in ``workdir``."""
    from jem_tf.run.workdir import RunLayout, backup_epochs_done

    backup = RunLayout(workdir).backup
    return backup, backup_epochs_done(backup)


def _train(config, workdir: str, verbose, overwrite: bool) -> int:
    import keras

    from jem_tf.run.workdir import RunLayout
    from jem_tf.training import pipeline as training
    from jem_tf.training.stability import TrainingDiverged

    backup = RunLayout(workdir).backup
    # A Ctrl-C that Python code swallowed on the way (see jem_tf.cli.INTERRUPTS) is raised at the next batch's end:
    # an interrupted training never runs on to the end.
    interrupt_check = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: INTERRUPTS.raise_if_interrupted())
    try:
        metrics = training.train_and_evaluate(config, workdir, verbose=verbose, overwrite=overwrite,
                                              callbacks=[interrupt_check])
    except TrainingDiverged as error:
        where = (f"The last good epoch is in {backup}; rerun with changed settings to resume from it."
                 if os.path.isdir(backup) else "No epoch completed.")
        print(f"python -m jem_tf.train: error: {error} {where}", file=sys.stderr)
        return 1
    detector = metrics.get("ood_detector")
    exported = (f"; exported {metrics['export_path']} (OOD detector {detector['score']})"
                if metrics.get("export_path") and detector else "")
    print(f"test_accuracy={metrics['test_accuracy']:.4f} test_ece={metrics['test_ece']:.4f} "
          f"test_nll={metrics['test_nll']:.4f} ({metrics['num_test']} test images){exported}; wrote {workdir}/")
    return 0


if __name__ == "__main__":
    exit_process(main())
