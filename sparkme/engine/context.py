"""What every sparse map of one forward pass shares: coordinates, batch, image size, conv backend.

Also the one definition of a MinkowskiEngine coordinate key's identity (:func:`key_id`), used
wherever maps are compared or kernel maps are cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["SparseContext", "key_id"]


def key_id(key: Any) -> tuple:
    """A hashable identity for a MinkowskiEngine ``CoordinateMapKey``: (tensor stride, name)."""
    stride, name = key.get_key()
    return (tuple(stride), name)


class SparseContext:
    """Per-forward state: the coordinate manager, batch and image size, the conv backend, and the
    stack of module labels running now (so errors can name the module)."""

    def __init__(self, manager: Any, batch_size: int, image_size: tuple[int, ...], conv_fn: Callable, device):
        self.manager = manager
        self.batch_size = batch_size
        self.image_size = image_size
        self.conv_fn = conv_fn
        self.device = torch.device(device)
        self.module_stack: list[str] = []
        self._coordinates: dict[tuple, torch.Tensor] = {}
        self._counts: dict[tuple, torch.Tensor] = {}

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return len(self.image_size)

    def where(self) -> str:
        return f" in module {self.module_stack[-1]}" if self.module_stack else ""

    def coordinates(self, key: Any) -> torch.Tensor:
        """``[N, 1 + dims]`` int64 (batch, then y, x or z, y, x) in pixel units, row-aligned with the
        features on ``key``."""
        ident = key_id(key)
        if ident not in self._coordinates:
            self._coordinates[ident] = self.manager.get_coordinates(key).long().to(self.device)
        return self._coordinates[ident]

    def batch_index(self, key: Any) -> torch.Tensor:
        return self.coordinates(key)[:, 0]

    def counts(self, key: Any) -> torch.Tensor:
        """Active sites per sample, ``[B]`` int64."""
        ident = key_id(key)
        if ident not in self._counts:
            self._counts[ident] = torch.bincount(self.batch_index(key), minlength=self.batch_size)
        return self._counts[ident]
