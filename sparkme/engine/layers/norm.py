"""Normalization on sparse maps: statistics over active sites only (BatchNorm, GroupNorm, InstanceNorm),
per-site LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedLayerError
from ..sparse_map import SparseMap, implements, require_map

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm"]


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


def _per_sample_norm(x: SparseMap, num_groups: int, eps: float):
    """Normalize per sample and channel group over the active sites (biased variance, like torch);
    also returns the ``[B, groups]`` mean and variance and the active sites per sample ``[B]``."""
    features, batch_index = x.features, x.ctx.batch_index(x.key)
    sites, channels = features.shape
    grouped = features.reshape(sites, num_groups, channels // num_groups)
    counts = x.ctx.counts(x.key)
    count = (counts.clamp(min=1) * (channels // num_groups)).to(features.dtype)[:, None]
    zeros = features.new_zeros(x.ctx.batch_size, num_groups)
    mean = zeros.index_add(0, batch_index, grouped.sum(2)) / count
    centred = grouped - mean.index_select(0, batch_index)[:, :, None]
    var = zeros.index_add(0, batch_index, (centred * centred).sum(2)) / count
    out = (centred * torch.rsqrt(var.index_select(0, batch_index) + eps)[:, :, None]).reshape(sites, channels)
    return out, mean, var, counts


def _affine(out: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


@implements(F.group_norm)
def group_norm(x: SparseMap, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> SparseMap:
    """GroupNorm per sample and group over the active sites (biased variance, like torch)."""
    x = require_map(x, "group_norm")
    if x.channels_last:
        raise UnsupportedLayerError(f"group_norm on a channels-last map{x.ctx.where()}")
    return x.with_features(_affine(_per_sample_norm(x, num_groups, eps)[0], weight, bias))


@implements(F.instance_norm)
def instance_norm(
    x: SparseMap,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> SparseMap:
    """InstanceNorm per sample and channel over the active sites. With running statistics they are
    updated like torch does (the batch mean of each sample's mean and unbiased variance)."""
    x = require_map(x, "instance_norm")
    if x.channels_last:
        raise UnsupportedLayerError(f"instance_norm on a channels-last map{x.ctx.where()}")
    channels = x.features.shape[1]
    if not use_input_stats:
        return x.with_features(F.batch_norm(x.features, running_mean, running_var, weight, bias, False, 0.0, eps))
    out, mean, var, counts = _per_sample_norm(x, channels, eps)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            n = counts.to(var.dtype)[:, None]
            unbiased = var * n / (n - 1).clamp(min=1)
            running_mean.mul_(1 - momentum).add_(momentum * mean.mean(0).to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_(momentum * unbiased.mean(0).to(running_var.dtype))
    return x.with_features(_affine(out, weight, bias))
