"""Sparse implementations of the torch functions dense CNN modules call (registered on import)."""

from . import conv, elementwise, linear, norm, pool, reduce, sync_bn

__all__ = ["conv", "elementwise", "linear", "norm", "pool", "reduce", "sync_bn"]
