"""Conv2d / Conv3d on sparse maps: geometry checked here, arithmetic done by the selected backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedLayerError
from ..geometry import conv_geometry_problem, ntuple
from ..sparse_map import SparseMap, implements, require_map

__all__ = ["conv2d", "conv3d", "check_divisible", "check_rank"]


def check_divisible(x: SparseMap, stride: tuple[int, ...], op: str) -> None:
    """Strided ops need the map's side to be a multiple of the stride, or the dense grid would differ."""
    if any(side % s for side, s in zip(x.spatial_size, stride)):
        size = "x".join(str(side) for side in x.spatial_size)
        raise UnsupportedLayerError(
            f"{op} with stride {stride} on a {size} map{x.ctx.where()}: the map side must be a multiple "
            "of the stride (use an input size that is a multiple of the encoder's downsample ratio)"
        )


def check_rank(x: SparseMap, dims: int, op: str) -> None:
    """A ``dims``-d op (``conv2d``, ``max_pool3d``...) only runs on a map with that many spatial axes."""
    if x.ctx.spatial_dims != dims:
        raise UnsupportedLayerError(
            f"{op} on a {x.ctx.spatial_dims}-d sparse map of logical shape {tuple(x.shape)}{x.ctx.where()}: "
            f"a {dims}-d layer cannot run on {x.ctx.spatial_dims}-d inputs"
        )


def _conv(x, weight, bias, stride, padding, dilation, groups: int, dims: int) -> SparseMap:
    op = f"conv{dims}d"
    x = require_map(x, op)
    check_rank(x, dims, op)
    if x.channels_last:
        raise UnsupportedLayerError(f"{op} on a channels-last map{x.ctx.where()}")
    if isinstance(weight, SparseMap) or isinstance(bias, SparseMap):
        raise UnsupportedLayerError(f"{op} with a sparse weight{x.ctx.where()}")
    kernel = tuple(weight.shape[2:])
    stride, dilation = ntuple(stride, dims, "stride"), ntuple(dilation, dims, "dilation")
    problem = conv_geometry_problem(kernel, stride, padding, dilation)
    if problem is not None:
        raise UnsupportedLayerError(f"Conv{dims}d{x.ctx.where()}: {problem}")
    if weight.shape[1] * groups != x.features.shape[1]:
        raise UnsupportedLayerError(
            f"{op} expects {weight.shape[1] * groups} input channels, got {x.features.shape[1]}{x.ctx.where()}"
        )
    check_divisible(x, stride, op)
    out = x.ctx.conv_fn(x.sparse_tensor(), weight, bias, stride=stride, dilation=dilation, groups=groups)
    tensor_stride = tuple(t * s for t, s in zip(x.tensor_stride, stride))
    return SparseMap(out.F, out.coordinate_map_key, tensor_stride, x.ctx)


@implements(F.conv2d, torch.conv2d)
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> SparseMap:
    return _conv(x, weight, bias, stride, padding, dilation, groups, 2)


@implements(F.conv3d, torch.conv3d)
def conv3d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> SparseMap:
    return _conv(x, weight, bias, stride, padding, dilation, groups, 3)
