"""sparkme: SparK masked pretraining for any convolutional network on a true sparse engine.

Public interface::

    import sparkme
    encoder = sparkme.sparsify(cnn)             # any dense CNN -> SparseEncoder
    features = encoder(images, visible)         # dense maps, zeros at hidden sites
    model = sparkme.SparK(encoder, mask_ratio=0.6)
    loss, pred, mask = model(images)            # mask is True where a patch is hidden

Heavy modules (MinkowskiEngine, timm) are imported on first use.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# MinkowskiEngine warns on every import of a CPU-only build; on a CPU machine that is expected.
warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY", category=UserWarning)

__version__ = "0.1.0"

_LAZY = {
    "sparsify": "sparkme.engine",
    "SparseEncoder": "sparkme.engine",
    "UnsupportedLayerError": "sparkme.engine",
    "SparK": "sparkme.method",
    "LightDecoder": "sparkme.method",
    "random_patch_mask": "sparkme.method",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparkme' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
