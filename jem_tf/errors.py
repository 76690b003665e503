"""The error a command line reports in one line: :class:`UsageError`, bad input from the user.

A ``UsageError`` is a ``ValueError`` (bad input to the library stays a ``ValueError`` for its callers); the
commands (``python -m jem_tf.train``, ``tune``, ``evaluate``, ``export``) print it as one line and exit with code 2.
Every other exception, a ``ValueError`` from an internal invariant included, keeps its traceback (exit code 1).
Config validation, recipe and data loading, work-directory checks and model-file loading raise it.
"""

from __future__ import annotations

import contextlib
import importlib

# The optional dependencies: module -> (its package on PyPI, the jem-tf extra that installs it).
EXTRAS = {"tensorflow_datasets": ("tensorflow-datasets", "tfds"), "keras_tuner": ("keras-tuner", "tune")}


class UsageError(ValueError):
    """Bad input from the user (a flag, a recipe, a data set, a file or directory named), in one line that says what
    to change. Raised before the work it would spoil, wherever possible."""


@contextlib.contextmanager
def as_usage_error():
    """Inside: a ``ValueError`` is a :class:`UsageError` with the same message (the original is its cause).

    Only around calls that read what the user named through modules raising plain ``ValueError`` (e.g. a ``.npz``
    file's checks in :mod:`jem_tf.data.npz`), never around computation.

    Example:
        >>> with as_usage_error():
        ...     data = load_dataset(name)
    """
    try:
        yield
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(str(error)) from error


def import_extra(module: str, *, needed_for: str):
    """The optional dependency ``module`` (a key of :data:`EXTRAS`), imported; if it is not installed, a
    :class:`UsageError` saying what needs it and which extra installs it (``pip install 'jem-tf[tfds]'``)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise  # the package is there but broken: keep the traceback
        package, extra = EXTRAS[module]
        raise UsageError(f"{needed_for} needs {package}, an optional dependency of jem-tf that is not installed: "
                         f"pip install 'jem-tf[{extra}]'") from None
