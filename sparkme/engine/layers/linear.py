"""Per-site channel mixing and layout ops: Linear over channels, permute, concatenation along channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedLayerError
from ..sparse_map import SparseMap, implements, key_id, require_map

__all__ = ["linear", "permute", "cat"]


@implements(F.linear)
def linear(x: SparseMap, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SparseMap:
    """``nn.Linear`` over the channels of a channels-last map (ConvNeXt MLPs)."""
    x = require_map(x, "linear")
    if not x.channels_last:
        raise UnsupportedLayerError(
            f"linear on a channels-first map{x.ctx.where()}: it would mix the W axis; permute to channels-last first"
        )
    return x.with_features(F.linear(x.features, weight, bias))


@implements(torch.permute, torch.Tensor.permute)
def permute(x: SparseMap, *dims) -> SparseMap:
    return require_map(x, "permute").permute(*dims)


@implements(torch.cat, torch.concat, torch.concatenate)
def cat(tensors, dim: int = 0) -> SparseMap:
    """Concatenate maps on the same sites along the channel dim."""
    maps = list(tensors)
    if not all(isinstance(m, SparseMap) for m in maps):
        raise UnsupportedLayerError("cat mixes sparse maps and dense tensors")
    ref = maps[0]
    if dim % ref.ndim != ref.channel_dim:
        raise UnsupportedLayerError(f"cat along dim {dim} of sparse maps{ref.ctx.where()}: only the channel dim")
    if any(key_id(m.key) != key_id(ref.key) or m.channels_last != ref.channels_last for m in maps):
        raise UnsupportedLayerError(f"cat of sparse maps on different sites or layouts{ref.ctx.where()}")
    return ref.with_features(torch.cat([m.features for m in maps], dim=1))
