"""SyncBatchNorm across processes on sparse maps.

Multi-process ``SyncBatchNorm`` runs an autograd Function that a :class:`SparseMap` cannot enter.
Its twin hands torch's own implementation the active sites as a dense ``[N, C, 1, 1]`` batch, so
statistics are gathered over the active sites of every process (counts included) exactly as
torch does for dense maps. Parameter names and state are those of ``nn.SyncBatchNorm``.
"""

from __future__ import annotations

from torch import nn

from ..sparse_map import SparseMap

__all__ = ["SparseSyncBatchNorm", "adopt_sync_batchnorms"]


class SparseSyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that also accepts a :class:`SparseMap` (statistics over active sites)."""

    def forward(self, input):  # noqa: A002 - torch's name
        if not isinstance(input, SparseMap):
            return super().forward(input)
        if input.channels_last:
            from ..errors import UnsupportedLayerError

            raise UnsupportedLayerError(f"SyncBatchNorm on a channels-last map{input.ctx.where()}")
        out = super().forward(input.features[:, :, None, None])
        return input.with_features(out.reshape(out.shape[0], out.shape[1]))


def adopt_sync_batchnorms(model: nn.Module) -> None:
    """Give every ``nn.SyncBatchNorm`` in ``model`` the sparse-aware forward (in place, state kept)."""
    for module in model.modules():
        if type(module) is nn.SyncBatchNorm:
            module.__class__ = SparseSyncBatchNorm
