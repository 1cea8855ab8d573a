"""The error type for problems a user fixes, not a bug: every command line reports it as one line."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input or environment (a setting, a file, a device, a busy run dir) that the message explains.

    A ``ValueError`` so callers that already catch bad input keep catching it. The command
    lines print it as one line (``sparkme.cli.errors``) instead of a traceback.
    """
