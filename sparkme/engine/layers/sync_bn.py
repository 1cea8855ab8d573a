"""SyncBatchNorm across processes, on sparse maps and dense tensors, on any device.

torch's ``nn.SyncBatchNorm`` refuses CPU tensors and its autograd Function cannot take a
:class:`SparseMap`. The twin here computes the statistics itself: every rank sums its
features and counts (the active sites of a sparse map; every pixel of a dense map), the sums
are all-reduced (gloo or nccl), and the result equals one BatchNorm over the concatenated
batch of all ranks, running statistics (unbiased variance over the global count) and
gradients included. The all-reduce is differentiable, so each rank's input gradient carries
the other ranks' terms exactly as torch's SyncBatchNorm backward does. Parameter names,
buffers and state dict are those of ``nn.BatchNorm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UnsupportedLayerError
from ..sparse_map import SparseMap

__all__ = ["SparseSyncBatchNorm", "adopt_sync_batchnorms", "convert_sync_batchnorms", "sync_batch_norm"]


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` with its adjoint: the gradient is summed over ranks as well."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001 - torch's signature
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 - torch's signature
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-statistics factor of this step (cumulative average when ``momentum`` is None)."""
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked.item())
    return float(bn.momentum)


def sync_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, group=None) -> torch.Tensor:  # noqa: ANN001
    """Training-mode BatchNorm of ``x`` (``[N, C, *]``) with statistics over every rank of ``group``.

    Statistics are accumulated in at least float32 (two passes: mean, then centred squares) and the output
    has ``x``'s dtype. Updates ``bn``'s running statistics like ``F.batch_norm`` would for the
    concatenated batch.
    """
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    values = x.to(torch.promote_types(x.dtype, torch.float32))
    count = torch.full((1,), x.numel() // max(x.shape[1], 1), dtype=values.dtype, device=x.device)
    totals = _SumOverRanks.apply(torch.cat([values.sum(dims), count]), group)
    total_count = totals[-1].detach()
    mean = totals[:-1] / total_count
    centred = values - mean.view(shape)
    var = _SumOverRanks.apply(centred.square().sum(dims), group) / total_count
    out = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = _momentum(bn)
            unbiased = var * (total_count / (total_count - 1).clamp(min=1))
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    return out.to(x.dtype)


class SparseSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover every rank of ``process_group`` (all ranks by default).

    Takes a :class:`SparseMap` (statistics over its active sites) or a dense ``[N, C, *]`` tensor,
    on any device. Not an ``nn.SyncBatchNorm``: DDP refuses those on CPU. Without an initialised
    process group of more than one rank, or in eval mode, it is a plain BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,  # noqa: ANN001 - a torch ProcessGroup
        device=None,  # noqa: ANN001
        dtype=None,  # noqa: ANN001
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _sync_group(self):  # noqa: ANN202 - a ProcessGroup or None
        """The process group to reduce over, or None when this step needs no synchronisation."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input):  # noqa: A002, ANN001, ANN201 - torch's name
        sparse = isinstance(input, SparseMap)
        if sparse and input.channels_last:
            raise UnsupportedLayerError(f"SyncBatchNorm on a channels-last map{input.ctx.where()}")
        x = input.features if sparse else input
        group = self._sync_group()
        if group is None:
            out = super().forward(x)  # plain BatchNorm: torch's own kernel
        else:
            self._check_input_dim(x)
            out = sync_batch_norm(self, x, group)
        return input.with_features(out) if sparse else out


def _synchronised(bn: nn.modules.batchnorm._BatchNorm, process_group) -> SparseSyncBatchNorm:  # noqa: ANN001
    """A :class:`SparseSyncBatchNorm` sharing ``bn``'s parameters and buffers (same state dict)."""
    synced = SparseSyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
    synced.weight, synced.bias = bn.weight, bn.bias
    synced.running_mean, synced.running_var = bn.running_mean, bn.running_var
    synced.num_batches_tracked = bn.num_batches_tracked
    synced.train(bn.training)
    return synced


_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _replace(module: nn.Module, wanted, process_group, path: str = "") -> nn.Module:  # noqa: ANN001
    if wanted(module, path):
        return _synchronised(module, getattr(module, "process_group", None) or process_group)
    for name, child in module.named_children():
        replaced = _replace(child, wanted, process_group, f"{path}.{name}" if path else name)
        if replaced is not child:
            module.add_module(name, replaced)
    return module


def adopt_sync_batchnorms(model: nn.Module) -> nn.Module:
    """Replace each ``nn.SyncBatchNorm`` of ``model`` by a :class:`SparseSyncBatchNorm` (state, process group kept)."""
    return _replace(model, lambda m, _path: type(m) is nn.SyncBatchNorm, None)


def convert_sync_batchnorms(module: nn.Module, process_group=None) -> nn.Module:  # noqa: ANN001
    """Replace every BatchNorm of ``module`` (torch's SyncBatchNorm included) by a :class:`SparseSyncBatchNorm`.

    Same parameters, buffers and names (the state dict is unchanged); children are replaced in
    place and the (possibly new) root is returned. A BatchNorm subclass with more behaviour
    (e.g. timm's ``BatchNormAct2d``) is refused rather than stripped of it.
    """

    def wanted(candidate: nn.Module, path: str) -> bool:
        if type(candidate) in _PLAIN_BATCHNORMS:
            return True
        if isinstance(candidate, nn.modules.batchnorm._BatchNorm) and not isinstance(candidate, SparseSyncBatchNorm):
            raise ValueError(
                f"cannot synchronise {path or '<root>'} ({type(candidate).__name__}): only torch's BatchNorm1d/2d/3d "
                "and SyncBatchNorm are converted; set train.sync_bn=false for this model"
            )
        return False

    return _replace(module, wanted, process_group)
