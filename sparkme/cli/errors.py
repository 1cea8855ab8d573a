"""One line per user-facing error, for every command line.

A bad input or environment (a missing or damaged file, an impossible setting, a full
disk) is printed as ``<prog>: error: <message>`` on stderr: one line, no traceback, and a
non-zero exit status. ``sparkme-pretrain`` also appends the line to its run's log file.
Set ``SPARKME_TRACEBACK=1`` to print the traceback as well (for bug reports).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from sparkme.errors import UserError

__all__ = ["USER_ERRORS", "UserError", "one_line", "report_error", "user_errors"]

# What a user can fix: our own errors, bad values (ValueError), and files/disks (OSError).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)

Main = TypeVar("Main", bound=Callable[..., int])


def one_line(error: BaseException) -> str:
    """The error's message on one line (any run of whitespace, newlines included, becomes one space)."""
    return " ".join(str(error).split()) or type(error).__name__


def _append_to_log_files(line: str) -> None:
    """Write ``line`` to the file handlers of the root logger (the run's log), not to the console."""
    record = logging.LogRecord("sparkme", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            try:
                handler.stream.write(handler.format(record) + "\n")
                handler.flush()
            except (OSError, ValueError):  # a full disk or a closed file must not hide the message itself
                pass


def report_error(prog: str, error: BaseException, *, log_files: bool = False) -> str:
    """Print ``<prog>: error: <message>`` to stderr (and to the run's log files); returns that line."""
    line = f"{prog}: error: {one_line(error)}"
    if os.environ.get("SPARKME_TRACEBACK"):
        traceback.print_exception(error, file=sys.stderr)
    # one write, newline included: ranks of one launch share a pipe, and a pipe write this short is atomic
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    if log_files:
        _append_to_log_files(line)
    return line


def user_errors(prog: str, status: int = 2, also: tuple[type[BaseException], ...] = ()) -> Callable[[Main], Main]:
    """Decorate a console ``main(argv) -> int``: a user error (or one of ``also``) becomes one line and ``status``."""

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def wrapper(*args: object, **kwargs: object) -> int:
            try:
                return main(*args, **kwargs)
            except (*USER_ERRORS, *also) as error:
                report_error(prog, error)
                return status

        return wrapper  # type: ignore[return-value]

    return decorate
