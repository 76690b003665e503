"""Command-line helpers shared by ``jem_tf.train``, ``jem_tf.tune``, ``jem_tf.evaluate`` and ``jem_tf.export``:
one-line errors with exit code 2 for bad flags and for :class:`~jem_tf.errors.UsageError` (every other error keeps
its traceback), and one flag per :class:`jem_tf.run.config.TrainConfig` field."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import typing
from typing import Callable, List, Optional, Sequence

from jem_tf.errors import UsageError
from jem_tf.files import is_disk_full
from jem_tf.run import config as config_lib
from jem_tf.run.config_rules import choices

DEFAULT_RECIPE = "digits"
_NONE_WORDS = ("none", "null")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports errors as one line on stderr and exits with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    @contextlib.contextmanager
    def usage_errors(self):
        """Inside: a :class:`~jem_tf.errors.UsageError` is reported as one line (exit code 2); any other exception
        propagates with its traceback."""
        try:
            yield
        except UsageError as error:
            self.error(str(error))


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


def import_library() -> None:
    """Imports every module of jem_tf's public API, as ``import jem_tf`` does outside a command (a command imports
    the package lazily, to parse its flags first): Keras finds the classes a saved model names (``JEM``, its layers,
    the learning-rate schedule of its optimizer) only once their modules are imported."""
    import jem_tf

    for name in jem_tf.__all__:
        getattr(jem_tf, name)


def dataset_argument(*, training: bool = False, extra: Sequence[str] = ()) -> Callable[[str], str]:
    """An argparse ``type=`` for dataset flags: the names in ``extra`` (e.g. synthetic OOD sets) and what
    :func:`jem_tf.data.dataset_problem` accepts; anything else is a one-line usage error listing the options. The
    data modules (and TensorFlow) are imported when a value is parsed, not when the parser is built."""

    def parse(name: str) -> str:
        if name in extra:
            return name
        from jem_tf.data import dataset_problem

        problem = dataset_problem(name, training=training)
        if problem is None:
            return name
        if extra and problem.startswith("one of "):
            problem = f"one of {', '.join(extra)}, {problem[len('one of '):]}"
        raise argparse.ArgumentTypeError(f"must be {problem}; received {name!r}")

    parse.__name__ = "dataset"
    return parse


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--recipe`` and one override flag per :class:`TrainConfig` field (shared with ``jem_tf.tune``)."""
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"recipe name in trainers/ = jem_tf.recipes "
                             f"({', '.join(config_lib.available_recipes())}) "
                             "or path to a JSON recipe (default: %(default)s)")
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
            overrides.add_argument(flag, dest=name, choices=choices()["strategy"], default=None, help=help_text)
            continue
        if name == "image_size":
            overrides.add_argument(flag, dest=name, type=int, nargs=2, metavar=("H", "W"), default=None,
                                   help="resize an image folder's images to H x W pixels " + help_text)
            continue
        overrides.add_argument(flag, dest=name, type=_parser_for(annotation), default=None, help=help_text)


def config_from_args(parser: OneLineErrorParser, args: argparse.Namespace):
    """The recipe named by ``args.recipe`` with the override flags applied; bad values exit with code 2."""
    with parser.usage_errors():
        config = config_lib.load_recipe(args.recipe)
        overrides = {name: getattr(args, name) for name in config_lib.field_names()
                     if getattr(args, name) is not None}
        if (overrides.get("chain_init", config.chain_init) != "class_gaussian"
                and "chain_init_uniform_fraction" not in overrides):
            # The recipe's share of uniform-noise starts among class-Gaussian ones: moot once every start is
            # uniform noise (e.g. `--recipe digits --chain-init uniform`).
            overrides["chain_init_uniform_fraction"] = 0.0
        return config.replace(**overrides).validate()


def recipe_name(recipe: str) -> str:
    return recipe.rsplit("/", 1)[-1].removesuffix(".json")


class _Interrupts:
    """SIGINT while a command runs: ``KeyboardInterrupt`` at the first Ctrl-C, and remembered, so that an interrupt
    that Python code swallowed (raised inside a finalizer or a library's ``except BaseException``) is raised again at
    the next :meth:`raise_if_interrupted` (``train`` calls it after every batch through a Keras ``LambdaCallback``,
    and :func:`run_command` before it reports success). Further Ctrl-Cs are ignored: the clean-up (lock, temporary
    files) must finish."""

    def __init__(self):
        self.interrupted = False

    def handle(self, signum, frame):
        if self.interrupted:
            return  # the clean-up of the first one is running
        self.interrupted = True
        raise KeyboardInterrupt

    def raise_if_interrupted(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt


INTERRUPTS = _Interrupts()


def _interrupted_while_starting(signum, frame):
    print("python -m jem_tf: interrupted while starting (importing TensorFlow and the command); nothing was written",
          file=sys.stderr)
    raise SystemExit(130)


def handle_ctrl_c_while_starting() -> None:
    """For ``python -m jem_tf.<command>`` only (the package calls it then): until :func:`run_command` takes SIGINT
    over, a Ctrl-C exits with one line and code 130 (``SystemExit``: no traceback from the imports it interrupts)."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def exit_process(code: int) -> None:
    """Ends ``python -m jem_tf.<command>`` with ``code``. After a Ctrl-C (130) the streams are flushed and the process
    ends at once: the interpreter's teardown of an interrupted TensorFlow could otherwise end it by SIGINT (status
    -2 instead of 130; seen in 2 of 12 runs of the Ctrl-C test). Otherwise the work is done and its code decided, so
    a Ctrl-C during the teardown (about a second with TensorFlow loaded) is ignored: Python resets a SIGINT handler
    to the default action before it tears down, which would end a finished command by SIGINT (status -2, no line)."""
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # SIG_IGN is the one disposition the teardown keeps
    sys.exit(code)


def run_command(prog: str, body: Callable[[], int], *, interrupted: Optional[Callable[[], str]] = None,
                disk_full: Optional[Callable[[BaseException], str]] = None) -> int:
    """Runs a command's ``body`` (which returns its exit code) with the exit codes every jem-tf command uses, each
    outcome in one line on stderr: 2 for bad input (``UsageError``), 1 for a full disk, 130 for Ctrl-C (also while
    TensorFlow is being imported, which ``body`` does). ``interrupted()`` and ``disk_full(error)`` add what to do
    next to those lines. Any other exception propagates with its traceback."""
    own_sigint = (threading.current_thread() is threading.main_thread()
                  and signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _interrupted_while_starting))
    unraisablehook = sys.unraisablehook
    if own_sigint:
        signal.signal(signal.SIGINT, INTERRUPTS.handle)
        # A Ctrl-C raised inside a finalizer or weakref callback is "ignored" by Python, which prints its traceback:
        # it is remembered and raised again (above), so only that printout is left out.
        sys.unraisablehook = lambda unraisable: (None if isinstance(unraisable.exc_value, KeyboardInterrupt)
                                                 else unraisablehook(unraisable))
    try:
        code = body()
        INTERRUPTS.raise_if_interrupted()  # a Ctrl-C that was swallowed on the way: not a success
        return code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + ("" if interrupted is None else f"; {interrupted()}"), file=sys.stderr)
        return 130
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a full disk: OSError, DiskFullError, or wrapped by Keras or h5py
        if not is_disk_full(error):
            raise
        print(f"{prog}: error: {error if disk_full is None else disk_full(error)}", file=sys.stderr)
        return 1
    finally:
        if own_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.unraisablehook = unraisablehook
            # The Ctrl-C was this command's: a later command in the process (one that does not own SIGINT, say,
            # because the process ignores it) must not find it remembered.
            INTERRUPTS.interrupted = False
