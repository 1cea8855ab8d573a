"""The engine's one error type: a layer or operation that cannot keep sparse semantics."""

from __future__ import annotations

__all__ = ["UnsupportedLayerError"]


class UnsupportedLayerError(ValueError):
    """Raised when a module or an operation cannot run on visible sites only without changing its result.

    The message names the module path and type (when known) and says why, so the user can
    replace that layer or pass ``stages=`` that stop before it.
    """
