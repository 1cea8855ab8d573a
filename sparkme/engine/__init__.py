"""The sparse engine: run any dense CNN on the visible pixels of masked images, exactly.

``sparsify(cnn)`` returns a :class:`SparseEncoder`; see its docstring and docs/engine.md.
"""

from .encoder import SparseEncoder, sparsify
from .errors import UnsupportedLayerError
from .hierarchy import Stage
from .sites import visible_to_pixels, visible_to_sites
from .sparse_map import SparseMap

__all__ = [
    "SparseEncoder",
    "SparseMap",
    "Stage",
    "UnsupportedLayerError",
    "sparsify",
    "visible_to_pixels",
    "visible_to_sites",
]
