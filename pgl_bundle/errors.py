"""Errors the user can fix (bad data, an occupied or unwritable output folder, a full disk), and how they are shown.

``python -m monai.bundle run`` wraps any error raised while a config expression is evaluated in
``RuntimeError: Failed to evaluate ConfigExpression ...``, whose traceback (60 to 90 lines) would bury the actual
message. :func:`report_user_errors_last` makes an uncaught :class:`UserError` (found anywhere in the exception's chain
of causes and contexts) print as its message alone, as command-line tools do; ``PGL_DEBUG=1`` in the environment
prints Python's full traceback before it. Other exceptions print as usual. MONAI offers no hook for this, hence
``sys.excepthook``. A user error raised during a run passes through MONAI's handlers first: their tracebacks of it are
left out of the log (a log record factory) and open progress bars are closed before the ``ERROR:`` line, so
that it stays the last line printed.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import traceback
from types import TracebackType

from tqdm import tqdm

__all__ = [
    "DEBUG_VARIABLE",
    "BadInputError",
    "DiskSpaceError",
    "InputNotFoundError",
    "NoOutputError",
    "OutputExistsError",
    "OutputFolderError",
    "UserError",
    "found_instead",
    "free_space",
    "full_disk_error",
    "report_user_errors_last",
    "require_file",
    "size_text",
    "user_error_in_chain",
]

DEBUG_VARIABLE = "PGL_DEBUG"  # set (to anything but "" or "0"): a user error prints Python's traceback too


class UserError(Exception):
    """A problem of the run's input or environment that the user fixes; the message names the file and the fix."""


class BadInputError(UserError, ValueError):
    """Data, datalist or checkpoint that cannot be used."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the run needs does not exist (the message says what was looked for and what was found)."""


class OutputExistsError(UserError, FileExistsError):
    """The output folder holds another run's results, which the run would overwrite."""


class NoOutputError(UserError, RuntimeError):
    """A run ended without writing the result it exists for (e.g. fine-tuning without ``models/model.pt``)."""


class DiskSpaceError(UserError, OSError):
    """Not enough free disk space (checkpoints, prepared arrays), found before the work starts or when a write fails.

    Raised as ``DiskSpaceError(errno.ENOSPC, message)``; it reads as the message alone, without ``[Errno 28]``.
    """

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class OutputFolderError(UserError, OSError):
    """A folder the run writes cannot be created or written (read-only, no permission, a file on its path)."""


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


def size_text(num_bytes: float) -> str:
    """``"916 MB"``, ``"2.02 GB"`` (decimal units, as ``ls`` and ``df -H`` count): a size for a message."""
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.0f} MB"


def free_space(folder: str) -> tuple[int, str]:
    """Free bytes on the disk that holds ``folder`` (or would: its nearest existing parent), and that parent."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free, existing


def full_disk_error(error: BaseException, folder: str, needed: int = 0) -> OSError | None:
    """The error in ``error``'s chain that says the disk of ``folder`` is full, or None.

    That is an ``OSError`` with errno ENOSPC or EDQUOT, also as the context of another error (``torch.save`` raises
    ``RuntimeError: [enforce fail at inline_container.cc] ...`` with it), or any ``OSError`` without an errno while
    fewer than ``needed`` bytes are free (NumPy's short write: ``OSError: 1240932 requested and 466880 written``).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and not isinstance(error, UserError):
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                return error
            if error.errno is None and free_space(folder)[0] < needed:
                return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def user_error_in_chain(error: BaseException | None) -> UserError | None:
    """The first :class:`UserError` in ``error``'s chain of causes and contexts, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _debug() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0")


def _without_user_error_traceback(factory):
    """``logging``'s record factory ``factory``, making the records of a user error without its traceback (MONAI's
    ``StatsHandler`` logs every exception of a run with one, once per engine it passes through, on a logger of its
    own); the message stays. With ``PGL_DEBUG=1`` records are made unchanged."""

    def make(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if record.exc_info and user_error_in_chain(record.exc_info[1]) is not None and not _debug():
            record.exc_info = None
        return record

    make.strips_user_errors = True
    return make


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    cause = user_error_in_chain(error)
    if cause is None or _debug():
        traceback.print_exception(kind, error, tb)
    if cause is not None:
        # a bar left open by the failed run would be drawn again when it is garbage-collected, after the ERROR line
        for bar in list(tqdm._instances):
            bar.close()
        sys.stdout.flush()
        text = cause.args[-1] if cause.args else str(cause)  # OSError(errno, message): the message
        print(f"ERROR: {type(cause).__name__}: {text}", file=sys.stderr)


def report_user_errors_last() -> None:
    """Make an uncaught :class:`UserError` print as its message alone: ``ERROR: <kind>: <message>``.

    The traceback is printed before it only with ``PGL_DEBUG=1`` (:data:`DEBUG_VARIABLE`). Called by the configs'
    first ``run`` or ``initialize`` step and by ``python -m pgl_bundle``; idempotent. Other exceptions print exactly
    as before. Log records of a user error leave out its traceback too (a record factory: MONAI's handlers log on
    loggers of their own, made later).
    """
    sys.excepthook = _excepthook
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "strips_user_errors", False):
        logging.setLogRecordFactory(_without_user_error_traceback(factory))
