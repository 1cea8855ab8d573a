"""Normalization on sparse maps: statistics over active sites only (BatchNorm, GroupNorm), per-site LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedLayerError
from ..sparse_map import SparseMap, implements, require_map

__all__ = ["batch_norm", "layer_norm", "group_norm"]


@implements(F.batch_norm)
def batch_norm(
    x: SparseMap,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> SparseMap:
    """Batch statistics over the active sites of the whole batch; running statistics updated from them
    with torch's own rule (unbiased variance), because ``[N, C]`` rows *are* the batch."""
    x = require_map(x, "batch_norm")
    if x.channels_last:
        raise UnsupportedLayerError(f"batch_norm on a channels-last map{x.ctx.where()}")
    out = F.batch_norm(x.features, running_mean, running_var, weight, bias, training, momentum, eps)
    return x.with_features(out)


@implements(F.layer_norm)
def layer_norm(x: SparseMap, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> SparseMap:
    """LayerNorm over channels at each site (channels-last, as in ConvNeXt blocks and timm's LayerNorm2d)."""
    x = require_map(x, "layer_norm")
    channels = x.features.shape[1]
    if not x.channels_last or tuple(normalized_shape) != (channels,):
        raise UnsupportedLayerError(
            f"layer_norm over {tuple(normalized_shape)} on a map of logical shape {tuple(x.shape)}{x.ctx.where()}: "
            "only channels-last LayerNorm over the channels keeps sparse semantics"
        )
    return x.with_features(F.layer_norm(x.features, (channels,), weight, bias, eps))


@implements(F.group_norm)
def group_norm(x: SparseMap, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> SparseMap:
    """GroupNorm per sample and group over the active sites (biased variance, like torch)."""
    x = require_map(x, "group_norm")
    if x.channels_last:
        raise UnsupportedLayerError(f"group_norm on a channels-last map{x.ctx.where()}")
    features, batch_index = x.features, x.ctx.batch_index(x.key)
    sites, channels = features.shape
    grouped = features.reshape(sites, num_groups, channels // num_groups)
    count = (x.ctx.counts(x.key).clamp(min=1) * (channels // num_groups)).to(features.dtype)[:, None]
    zeros = features.new_zeros(x.ctx.batch_size, num_groups)
    mean = zeros.index_add(0, batch_index, grouped.sum(2)) / count
    centred = grouped - mean.index_select(0, batch_index)[:, :, None]
    var = zeros.index_add(0, batch_index, (centred * centred).sum(2)) / count
    out = (centred * torch.rsqrt(var.index_select(0, batch_index) + eps)[:, :, None]).reshape(sites, channels)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return x.with_features(out)
