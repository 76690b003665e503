"""Command line: ``python -m jem_tf.train [--recipe NAME|PATH] [--FIELD VALUE ...]``.

Trains the default recipe (``digits``: scikit-learn's 8x8 digits, no download) when run without
arguments. Every field of :class:`jem_tf.config.TrainConfig` is a flag (``--sgld-steps 40``).
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import List, Optional

from jem_tf import config as config_lib
from jem_tf.data import DataNotFoundError
from jem_tf.stability import TrainingDiverged
from jem_tf.training import train_and_evaluate

DEFAULT_RECIPE = "digits"
_NONE_WORDS = ("none", "null")


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports errors as one line on stderr and exits with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser_for(annotation):
    """An argparse ``type`` for a config field's annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        inner = _parser_for(next(a for a in args if a is not type(None)))

        def parse_optional(text):
            return None if text.lower() in _NONE_WORDS else inner(text)

        parse_optional.__name__ = getattr(inner, "__name__", "value")
        return parse_optional
    if origin in (list, List):
        item = _parser_for(args[0])

        def parse_list(text):
            return [item(t) for t in text.split(",") if t.strip()] if text.strip() else []

        parse_list.__name__ = f"comma-separated {getattr(item, '__name__', 'value')} list"
        return parse_list
    if annotation is bool:
        _parse_bool.__name__ = "bool"
        return _parse_bool
    return annotation


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="python -m jem_tf.train",
        description="Train a Joint Energy-based Model (JEM). Without arguments: the digits recipe on CPU.",
    )
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"recipe name in trainers/ ({', '.join(config_lib.available_recipes())}) "
                             "or path to a JSON recipe (default: %(default)s)")
    parser.add_argument("--workdir", default=None,
                        help="output directory (default: runs/<recipe name>)")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                        help="Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch")
    overrides = parser.add_argument_group("recipe overrides (any config field)")
    defaults = config_lib.TrainConfig()
    for name, annotation in config_lib.field_types().items():
        flag = "--" + name.replace("_", "-")
        help_text = f"(default from recipe; built-in default {getattr(defaults, name)!r})"
        if name == "batch_size":
            help_text = "global batch size, split over all replicas " + help_text
        if name == "cpu_devices":
            help_text = "split the CPU into N logical devices, e.g. to try --strategy mirrored " + help_text
        if name == "devices":
            help_text = "devices for --strategy mirrored, comma-separated (default: all GPUs) " + help_text
        if name == "strategy":
            overrides.add_argument(flag, dest=name, choices=config_lib.STRATEGIES, default=None, help=help_text)
            continue
        overrides.add_argument(flag, dest=name, type=_parser_for(annotation), default=None, help=help_text)
    return parser


def parse_config(argv: Optional[List[str]] = None):
    """Parses ``argv`` into ``(TrainConfig, workdir, verbose)``; bad values exit with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_lib.load_recipe(args.recipe)
        overrides = {name: getattr(args, name) for name in config_lib.field_names()
                     if getattr(args, name) is not None}
        config = config.replace(**overrides).validate()
    except ValueError as error:
        parser.error(str(error))
    recipe_name = args.recipe.rsplit("/", 1)[-1].removesuffix(".json")
    workdir = args.workdir or f"runs/{recipe_name}"
    return config, workdir, ("auto" if args.verbose is None else args.verbose)


def main(argv: Optional[List[str]] = None) -> int:
    config, workdir, verbose = parse_config(argv)
    try:
        metrics = train_and_evaluate(config, workdir, verbose=verbose)
    except DataNotFoundError as error:
        print(f"python -m jem_tf.train: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"python -m jem_tf.train: error: {error} The last good epoch is in {workdir}/backup; rerun "
              "with changed settings to resume from it.", file=sys.stderr)
        return 1
    print(f"test_accuracy={metrics['test_accuracy']:.4f} "
          f"({metrics['num_test']} test images); wrote {workdir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
