"""Max / average pooling on sparse maps: over active sites only (hidden sites act like -inf for max)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedLayerError
from ..geometry import ntuple, pool_geometry_problem
from ..sparse_map import SparseMap, implements, require_map
from .conv import check_divisible, check_rank

__all__ = ["max_pool2d", "max_pool3d", "avg_pool2d", "avg_pool3d", "cell_map"]


def cell_map(x: SparseMap, stride: tuple[int, ...]):
    """``(out_key, in_rows, out_rows)``: each active input site and the stride cell (output site) holding it."""
    manager = x.ctx.manager
    out_key = manager.stride(x.key, list(stride))
    in_rows, out_rows = manager.stride_map(x.key, out_key)
    return out_key, in_rows.long().to(x.device), out_rows.long().to(x.device)


def _strided(x: SparseMap, stride: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(t * s for t, s in zip(x.tensor_stride, stride))


def _tiled_pool(x: SparseMap, stride: tuple[int, ...], mode: str) -> SparseMap:
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
    out_key = manager.stride(x.key, list(stride)) if any(s != 1 for s in stride) else x.key
    generator = ME.KernelGenerator(
        kernel_size=list(kernel), stride=list(stride), dilation=list(dilation), dimension=x.ctx.spatial_dims
    )
    features = x.features
    # ME's pooling kernels take fp32/fp64 only; a max of bf16/fp16 values is exact in fp32 and back
    compute = features if features.dtype in (torch.float32, torch.float64) else features.float()
    out = ME.MinkowskiLocalPoolingFunction.apply(
        compute, ME.PoolingMode.LOCAL_MAX_POOLING, generator, x.key, out_key, manager
    )
    return SparseMap(out.to(features.dtype), out_key, _strided(x, stride), x.ctx)


def _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices, dims: int) -> SparseMap:
    op = f"max_pool{dims}d"
    x = require_map(x, op)
    check_rank(x, dims, op)
    if return_indices:
        raise UnsupportedLayerError(f"{op}(return_indices=True) on a sparse map{x.ctx.where()}")
    problem, tiles = pool_geometry_problem(op, kernel_size, stride, padding, dilation, ceil_mode, dims=dims)
    if problem is not None:
        raise UnsupportedLayerError(f"MaxPool{dims}d{x.ctx.where()}: {problem}")
    kernel = ntuple(kernel_size, dims)
    stride = ntuple(stride, dims) if stride not in (None, []) else kernel
    if x.channels_last:
        raise UnsupportedLayerError(f"{op} on a channels-last map{x.ctx.where()}")
    check_divisible(x, stride, op)
    if tiles:
        return _tiled_pool(x, stride, "max")
    return _centred_max_pool(x, kernel, stride, ntuple(dilation, dims))


def _avg_pool(x, kernel_size, stride, padding, ceil_mode, divisor_override, dims: int) -> SparseMap:
    op = f"avg_pool{dims}d"
    x = require_map(x, op)
    check_rank(x, dims, op)
    problem, _ = pool_geometry_problem(op, kernel_size, stride, padding, 1, ceil_mode, divisor_override, dims)
    if problem is not None:
        raise UnsupportedLayerError(f"AvgPool{dims}d{x.ctx.where()}: {problem}")
    if x.channels_last:
        raise UnsupportedLayerError(f"{op} on a channels-last map{x.ctx.where()}")
    stride = ntuple(kernel_size, dims)
    check_divisible(x, stride, op)
    return _tiled_pool(x, stride, "avg")


@implements(F.max_pool2d)
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices, 2)


@implements(F.max_pool3d)
def max_pool3d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices, 3)


@implements(F.avg_pool2d)
def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    return _avg_pool(x, kernel_size, stride, padding, ceil_mode, divisor_override, 2)


@implements(F.avg_pool3d)
def avg_pool3d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    return _avg_pool(x, kernel_size, stride, padding, ceil_mode, divisor_override, 3)
