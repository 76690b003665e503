"""The error a command line reports in one line: :class:`UsageError`, bad input from the user.

A ``UsageError`` is a ``ValueError`` (bad input to the library stays a ``ValueError`` for its callers); the
commands (``python -m jem_tf.train``, ``tune``, ``evaluate``, ``export``) print it as one line and exit with code 2.
Every other exception, a ``ValueError`` from an internal invariant included, keeps its traceback (exit code 1).
Config validation, recipe and data loading, work-directory checks and model-file loading raise it.
"""

from __future__ import annotations

import contextlib


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
