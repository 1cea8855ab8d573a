"""Reductions on sparse maps: global pooling, SE squeeze, GRN norms — per sample over active sites only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedLayerError
from ..sparse_map import SparseMap, implements, require_map
from .conv import check_rank

__all__ = ["reduce_sites"]


def _dims(x: SparseMap, dim, op: str) -> str:
    """'spatial' (per sample over sites) or 'channel' (per site over channels)."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        raise UnsupportedLayerError(f"{op} over all dimensions of a sparse map{x.ctx.where()}: give spatial dims")
    dims = {int(d) % x.ndim for d in ((dim,) if isinstance(dim, int) else dim)}
    if dims == set(x.spatial_dims):
        return "spatial"
    if dims == {x.channel_dim}:
        return "channel"
    raise UnsupportedLayerError(
        f"{op} over dims {sorted(dims)} of a sparse map with logical shape {tuple(x.shape)}{x.ctx.where()}: "
        "only the spatial dims (per sample over active sites) or the channel dim are supported"
    )


def _safe_sqrt(value: torch.Tensor) -> torch.Tensor:
    """sqrt whose gradient at 0 is 0 (like torch.norm's subgradient), not NaN."""
    positive = value > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, value, torch.ones_like(value))), 0.0)


def reduce_sites(x: SparseMap, kind: str) -> torch.Tensor:
    """Per-sample ``kind`` ('mean', 'sum', 'amax', 'norm2') over the active sites -> dense ``[B, C]``."""
    features, batch_index = x.features, x.ctx.batch_index(x.key)
    batch, channels = x.ctx.batch_size, features.shape[1]
    if kind == "amax":
        out = features.new_full((batch, channels), float("-inf"))
        index = batch_index[:, None].expand(-1, channels)
        return out.scatter_reduce(0, index, features, "amax", include_self=True)
    source = features * features if kind == "norm2" else features
    total = features.new_zeros(batch, channels).index_add(0, batch_index, source)
    if kind == "sum":
        return total
    if kind == "norm2":
        return _safe_sqrt(total)
    counts = x.ctx.counts(x.key).clamp(min=1).to(features.dtype)
    return total / counts[:, None]


def _reduce(x: SparseMap, dim, keepdim: bool, kind: str, op: str, dtype: torch.dtype | None = None):
    """``dtype`` casts the input first, as torch's reductions do."""
    x = require_map(x, op)
    if dtype is not None:
        x = x.with_features(x.features.to(dtype))
    where = _dims(x, dim, op)
    if where == "channel":
        if not keepdim:
            raise UnsupportedLayerError(
                f"{op} over channels without keepdim{x.ctx.where()}: the map would lose its layout"
            )
        per_site = {
            "mean": lambda f: f.mean(1, keepdim=True),
            "sum": lambda f: f.sum(1, keepdim=True),
            "amax": lambda f: f.amax(1, keepdim=True),
            "norm2": lambda f: torch.linalg.vector_norm(f, 2, dim=1, keepdim=True),
        }[kind]
        return x.with_features(per_site(x.features))
    pooled = reduce_sites(x, kind)
    if not keepdim:
        return pooled
    ones = (1,) * x.ctx.spatial_dims
    batch, channels = pooled.shape
    return pooled.view(batch, *ones, channels) if x.channels_last else pooled.view(batch, channels, *ones)


@implements(torch.mean, torch.Tensor.mean)
def mean(x, dim=None, keepdim: bool = False, *, dtype=None):
    return _reduce(x, dim, keepdim, "mean", "mean", dtype)


@implements(torch.sum, torch.Tensor.sum)
def sum_(x, dim=None, keepdim: bool = False, *, dtype=None):
    return _reduce(x, dim, keepdim, "sum", "sum", dtype)


@implements(torch.amax, torch.Tensor.amax)
def amax(x, dim=(), keepdim: bool = False):
    return _reduce(x, dim, keepdim, "amax", "amax")


@implements(torch.norm, torch.Tensor.norm)
def norm(x, p="fro", dim=None, keepdim: bool = False, dtype=None):
    if p not in (2, 2.0, "fro"):
        raise UnsupportedLayerError(f"norm with p={p!r} on a sparse map{x.ctx.where()}: only the 2-norm is supported")
    return _reduce(x, dim, keepdim, "norm2", "norm", dtype)


@implements(torch.linalg.vector_norm)
def vector_norm(x, ord=2, dim=None, keepdim: bool = False, *, dtype=None):
    return norm(x, ord, dim, keepdim, dtype)


def _global_pool(x, output_size, kind: str, op: str, dims: int, return_indices: bool = False):
    x = require_map(x, op)
    check_rank(x, dims, op)
    if output_size not in (1, (1,) * x.ctx.spatial_dims, [1] * x.ctx.spatial_dims) or return_indices:
        raise UnsupportedLayerError(
            f"{op} to {output_size} on a sparse map{x.ctx.where()}: "
            "only global pooling (output size 1) keeps sparse semantics"
        )
    return _reduce(x, x.spatial_dims, True, kind, op)


@implements(F.adaptive_avg_pool2d)
def adaptive_avg_pool2d(x, output_size):
    return _global_pool(x, output_size, "mean", "adaptive_avg_pool2d", 2)


@implements(F.adaptive_avg_pool3d)
def adaptive_avg_pool3d(x, output_size):
    return _global_pool(x, output_size, "mean", "adaptive_avg_pool3d", 3)


@implements(F.adaptive_max_pool2d)
def adaptive_max_pool2d(x, output_size, return_indices: bool = False):
    return _global_pool(x, output_size, "amax", "adaptive_max_pool2d", 2, return_indices)


@implements(F.adaptive_max_pool3d)
def adaptive_max_pool3d(x, output_size, return_indices: bool = False):
    return _global_pool(x, output_size, "amax", "adaptive_max_pool3d", 3, return_indices)
