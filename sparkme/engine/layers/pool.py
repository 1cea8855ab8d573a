"""Max / average pooling on sparse maps: over active sites only (hidden sites act like -inf for max)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedLayerError
from ..geometry import pair, pool_geometry_problem
from ..sparse_map import SparseMap, implements, require_map
from .conv import check_divisible

__all__ = ["max_pool2d", "avg_pool2d", "cell_map"]


def cell_map(x: SparseMap, stride: tuple[int, int]):
    """``(out_key, in_rows, out_rows)``: each active input site and the stride cell (output site) holding it."""
    manager = x.ctx.manager
    out_key = manager.stride(x.key, list(stride))
    in_rows, out_rows = manager.stride_map(x.key, out_key)
    return out_key, in_rows.long().to(x.device), out_rows.long().to(x.device)


def _strided(x: SparseMap, stride: tuple[int, int]) -> tuple[int, int]:
    return (x.tensor_stride[0] * stride[0], x.tensor_stride[1] * stride[1])


def _tiled_pool(x: SparseMap, stride: tuple[int, int], mode: str) -> SparseMap:
    out_key, in_rows, out_rows = cell_map(x, stride)
    features = x.features
    sites, channels = x.ctx.manager.size(out_key), features.shape[1]
    source = features.index_select(0, in_rows)
    if mode == "max":
        out = features.new_full((sites, channels), float("-inf"))
        out = out.scatter_reduce(0, out_rows[:, None].expand(-1, channels), source, "amax", include_self=True)
    else:
        total = features.new_zeros(sites, channels).index_add(0, out_rows, source)
        count = torch.bincount(out_rows, minlength=sites).clamp(min=1).to(features.dtype)
        out = total / count[:, None]
    return SparseMap(out, out_key, _strided(x, stride), x.ctx)


def _centred_max_pool(x: SparseMap, kernel, stride, dilation) -> SparseMap:
    import MinkowskiEngine as ME

    manager = x.ctx.manager
    out_key = manager.stride(x.key, list(stride)) if stride != (1, 1) else x.key
    generator = ME.KernelGenerator(kernel_size=list(kernel), stride=list(stride), dilation=list(dilation), dimension=2)
    features = x.features
    # ME's pooling kernels take fp32/fp64 only; a max of bf16/fp16 values is exact in fp32 and back
    compute = features if features.dtype in (torch.float32, torch.float64) else features.float()
    out = ME.MinkowskiLocalPoolingFunction.apply(
        compute, ME.PoolingMode.LOCAL_MAX_POOLING, generator, x.key, out_key, manager
    )
    return SparseMap(out.to(features.dtype), out_key, _strided(x, stride), x.ctx)


@implements(F.max_pool2d)
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    x = require_map(x, "max_pool2d")
    if return_indices:
        raise UnsupportedLayerError(f"max_pool2d(return_indices=True) on a sparse map{x.ctx.where()}")
    problem, tiles = pool_geometry_problem("max_pool2d", kernel_size, stride, padding, dilation, ceil_mode)
    if problem is not None:
        raise UnsupportedLayerError(f"MaxPool2d{x.ctx.where()}: {problem}")
    kernel = pair(kernel_size)
    stride = pair(stride) if stride not in (None, []) else kernel
    if x.channels_last:
        raise UnsupportedLayerError(f"max_pool2d on a channels-last map{x.ctx.where()}")
    check_divisible(x, stride, "max_pool2d")
    if tiles:
        return _tiled_pool(x, stride, "max")
    return _centred_max_pool(x, kernel, stride, pair(dilation))


@implements(F.avg_pool2d)
def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    x = require_map(x, "avg_pool2d")
    problem, _ = pool_geometry_problem("avg_pool2d", kernel_size, stride, padding, 1, ceil_mode, divisor_override)
    if problem is not None:
        raise UnsupportedLayerError(f"AvgPool2d{x.ctx.where()}: {problem}")
    if x.channels_last:
        raise UnsupportedLayerError(f"avg_pool2d on a channels-last map{x.ctx.where()}")
    stride = pair(kernel_size)
    check_divisible(x, stride, "avg_pool2d")
    return _tiled_pool(x, stride, "avg")
