"""Graceful stop on SIGTERM/SIGINT: the loop finishes its step, checkpoints and exits.

A cluster preempting a job (SLURM: SIGTERM, then SIGKILL after a grace period) or a Ctrl-C
sets a flag the training loop reads after each optimizer step; a second signal acts as usual
(SIGINT raises ``KeyboardInterrupt``, SIGTERM terminates), so an impatient user is never stuck.
The handlers exist only inside the ``with`` block that trains.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["GracefulStop", "RESUMABLE_EXIT_CODE"]

RESUMABLE_EXIT_CODE = 75
"""Exit status of a run stopped by a signal after saving (``EX_TEMPFAIL``: rerun to resume)."""


class GracefulStop:
    """Context manager; ``requested`` is the name of the first signal received, or None."""

    def __init__(self, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signums = signums
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in self.signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # second signal: back to the usual behaviour, now
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self._restore()
