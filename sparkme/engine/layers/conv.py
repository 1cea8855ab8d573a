"""Conv2d on sparse maps: geometry checked here, arithmetic done by the selected backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedLayerError
from ..geometry import conv_geometry_problem, pair
from ..sparse_map import SparseMap, implements, require_map

__all__ = ["conv2d"]


def check_divisible(x: SparseMap, stride: tuple[int, int], op: str) -> None:
    """Strided ops need the map's side to be a multiple of the stride, or the dense grid would differ."""
    height, width = x.spatial_size
    if height % stride[0] or width % stride[1]:
        raise UnsupportedLayerError(
            f"{op} with stride {stride} on a {height}x{width} map{x.ctx.where()}: the map side must be a multiple "
            "of the stride (use an image size that is a multiple of the encoder's downsample ratio)"
        )


@implements(F.conv2d, torch.conv2d)
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> SparseMap:
    x = require_map(x, "conv2d")
    if x.channels_last:
        raise UnsupportedLayerError(f"conv2d on a channels-last map{x.ctx.where()}")
    if isinstance(weight, SparseMap) or isinstance(bias, SparseMap):
        raise UnsupportedLayerError(f"conv2d with a sparse weight{x.ctx.where()}")
    kernel, stride, dilation = tuple(weight.shape[-2:]), pair(stride, "stride"), pair(dilation, "dilation")
    problem = conv_geometry_problem(kernel, stride, padding, dilation)
    if problem is not None:
        raise UnsupportedLayerError(f"Conv2d{x.ctx.where()}: {problem}")
    if weight.shape[1] * groups != x.features.shape[1]:
        raise UnsupportedLayerError(
            f"conv2d expects {weight.shape[1] * groups} input channels, got {x.features.shape[1]}{x.ctx.where()}"
        )
    check_divisible(x, stride, "conv2d")
    out = x.ctx.conv_fn(x.sparse_tensor(), weight, bias, stride=stride, dilation=dilation, groups=groups)
    tensor_stride = (x.tensor_stride[0] * stride[0], x.tensor_stride[1] * stride[1])
    return SparseMap(out.F, out.coordinate_map_key, tensor_stride, x.ctx)
