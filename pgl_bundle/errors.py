"""Errors the user can fix (bad data, an occupied output folder, a full disk), and showing them last.

``python -m monai.bundle run`` wraps any error raised while a config expression is evaluated in
``RuntimeError: Failed to evaluate ConfigExpression ...``, whose traceback (about 50 lines) then ends the output and
hides the actual message in the middle. :func:`report_user_errors_last` keeps Python's traceback (nothing is hidden)
and repeats the message of any :class:`UserError` in the chain after it, as the last lines printed. MONAI offers no
hook for this, hence ``sys.excepthook``.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

__all__ = [
    "BadInputError",
    "DiskSpaceError",
    "InputNotFoundError",
    "OutputExistsError",
    "UserError",
    "found_instead",
    "report_user_errors_last",
    "require_file",
    "user_error_in_chain",
]


class UserError(Exception):
    """A problem of the run's input or environment that the user fixes; the message names the file and the fix."""


class BadInputError(UserError, ValueError):
    """Data, datalist or checkpoint that cannot be used."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the run needs does not exist (the message says what was looked for and what was found)."""


class OutputExistsError(UserError, FileExistsError):
    """The output folder holds another run's results, which the run would overwrite."""


class DiskSpaceError(UserError, OSError):
    """Not enough free disk space for the checkpoints, found before training or when a save fails."""


_SHOWN = 5  # names quoted in a message


def found_instead(path: str) -> str:
    """For a "not found" message: the nearest existing folder on the way to ``path`` and what it holds."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    names = sorted(os.listdir(folder))
    shown = ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
    return f"{folder} holds {shown}" if names else f"{folder} is empty"


def require_file(path: str, what: str) -> str:
    """``path`` if it is a file; else :class:`InputNotFoundError` naming ``what`` it should be and what is there."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path}: {what} not found; {found_instead(path)}.")
    return path


def user_error_in_chain(error: BaseException | None) -> UserError | None:
    """The first :class:`UserError` in ``error``'s chain of causes and contexts, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    traceback.print_exception(kind, error, tb)
    cause = user_error_in_chain(error)
    if cause is not None:
        text = cause.args[-1] if cause.args else str(cause)  # OSError(errno, message): the message
        print(f"\nERROR: {type(cause).__name__}: {text}", file=sys.stderr)


def report_user_errors_last() -> None:
    """Make an uncaught :class:`UserError` the last thing printed: after the usual traceback, its message again.

    Called by the configs' first ``run`` step; idempotent. Other exceptions print exactly as before.
    """
    sys.excepthook = _excepthook
