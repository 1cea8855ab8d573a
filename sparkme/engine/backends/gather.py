"""Gather-GEMM-scatter sparse convolution on MinkowskiEngine's kernel maps (backend ``"gather"``).

MinkowskiEngine's stock CPU kernels loop over kernel offsets single-threaded (its
backward is ~77% of a sparse ResNet-50 step). This backend keeps ME's coordinates and
kernel maps but does the arithmetic with plain torch ops, which are multi-threaded on
the CPU and run in autocast's dtype (bf16 on tensor cores) when the caller runs the encoder under
``torch.autocast``; outside autocast they compute in the input's dtype:

- forward: a gather of every output site's ``k*k`` neighbours into ``[N_out, k*k*C_in]``
  (a zero row stands for a missing neighbour), then a GEMM (``bmm`` per group); on the CPU in
  blocks of output rows whose gathered matrix is about ``BLOCK_BYTES`` (bounded scratch instead of
  the whole im2col matrix; the backward's gathers and scatters walk the same blocks);
- backward to the weight: the same gather (recomputed, not stored) times the output grad;
- backward to the input: for stride-1 odd kernels the neighbour relation is symmetric,
  so it is the same gather-GEMM on the output grad with the flipped kernel (gathered in reverse
  offset order, so the kernel itself is never flipped); otherwise the
  ``[N_out, k*k*C_in]`` column grad is summed back through an inverse neighbour table (a
  gather too: deterministic, multi-threaded, no atomics and no autograd of indexing);
- depthwise convolutions: stride-1 forward and input grad run the dense depthwise kernel on a
  zero-filled map (exact: hidden inputs are zero) and gather the active rows; the weight grad and
  strided depthwise are a weighted sum over the ``k*k`` neighbours in cache-sized row blocks;
- 1x1 stride-1 convolutions are a plain ``mm`` on the active rows;
- the GEMM weight is kept ``[O, k*k*C_in]`` and used transposed (BLAS does that for free), so
  reshaping ``nn.Conv2d``'s ``[O, C_in, kh, kw]`` and its gradient only reorders each output
  channel's block instead of transposing the whole weight every step.

The neighbour tables (``backends/neighbours.py``) are cached per coordinate manager and per
(input map, output map, kernel, dilation), so every layer of a stage and the backward pass
reuse them. Semantics are ME's, see ``backends/__init__.py``.
"""

from __future__ import annotations

import math

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F
from torch.autograd import Function

from . import register_backend
from .neighbours import NeighbourPlan, neighbour_plan, output_key

__all__ = ["BLOCK_BYTES", "gather_conv"]

BLOCK_BYTES: int | None = 4 << 20
"""CPU: the gather-GEMM walks the output rows in blocks whose gathered ``[rows, k*k*C]`` matrix is about
this many bytes, forward and backward (``None`` or 0: one block, the whole im2col matrix at once)."""


def _grouped_mm(columns: torch.Tensor, weight: torch.Tensor, volume: int) -> torch.Tensor:
    """``[N, volume*C] x [groups, volume*C_g, O_g] -> [N, groups*O_g]``."""
    groups = weight.shape[0]
    if groups == 1:
        return columns @ weight[0]
    rows = columns.shape[0]
    per_group = columns.view(rows, volume, groups, -1).permute(2, 0, 1, 3).reshape(groups, rows, -1)
    return torch.bmm(per_group, weight).permute(1, 0, 2).reshape(rows, -1)


def _grouped_weight_grad(columns: torch.Tensor, grad_out: torch.Tensor, groups: int, volume: int) -> torch.Tensor:
    """``[groups, volume*C_g, O_g]`` gradient of ``_grouped_mm`` with respect to the weight.

    Computed as ``[groups, O_g, volume*C_g]`` and returned transposed (a view), the layout of the
    weight itself (see ``_conv_matrix``): the gradient flows back to ``nn.Conv2d``'s layout without
    a cache-hostile transpose copy.
    """
    if groups == 1:
        return (grad_out.t() @ columns).unsqueeze(0).transpose(1, 2)
    rows = columns.shape[0]
    per_group = columns.view(rows, volume, groups, -1).permute(2, 0, 1, 3).reshape(groups, rows, -1)
    return torch.bmm(grad_out.view(rows, groups, -1).permute(1, 2, 0), per_group).transpose(1, 2)


def _transposed_taps(weight: torch.Tensor, volume: int) -> torch.Tensor:
    """``[g, K*C_g, O_g] -> [g, K*O_g, C_g]``: each kernel offset's matrix transposed (offsets kept in order).

    With the neighbours gathered in reverse offset order this is the flipped, transposed kernel of a
    stride-1 input gradient. ``weight`` is stored ``[g, O_g, K*C_g]`` (``_conv_matrix``), so the copy
    moves whole ``C_g``-long rows (a ``flip`` here would cost ten times more).
    """
    groups, _, out_g = weight.shape
    stored = weight.transpose(1, 2).reshape(groups, out_g, volume, -1)  # a view for _conv_matrix's layout
    return stored.transpose(1, 2).reshape(groups, volume * out_g, -1)


def _column_grad(grad_out: torch.Tensor, weight: torch.Tensor, volume: int) -> torch.Tensor:
    """``[N_out*K, C_in]``: gradient of the gathered columns, one row per (output, offset)."""
    groups = weight.shape[0]
    rows = grad_out.shape[0]
    if groups == 1:
        return (grad_out @ weight[0].t()).view(rows * volume, -1)
    per_group = torch.bmm(grad_out.view(rows, groups, -1).transpose(0, 1), weight.transpose(1, 2))
    return per_group.view(groups, rows, volume, -1).permute(1, 2, 0, 3).reshape(rows * volume, -1)


def _block_rows(row_numel: int, like: torch.Tensor) -> int | None:
    """Rows per block of ``row_numel``-element scratch rows, about ``BLOCK_BYTES`` (CPU only; ``None``: one block)."""
    if not BLOCK_BYTES or like.device.type != "cpu":
        return None
    return max(16, BLOCK_BYTES // max(row_numel * like.element_size(), 1))


def _output_blocks(plan: NeighbourPlan, channels: int, rows: torch.Tensor) -> list[tuple[int, int]]:
    """Output row ranges whose gathered ``[rows, volume * C]`` block is about ``BLOCK_BYTES`` (CPU only)."""
    per_block = _block_rows(plan.volume * channels, rows) or max(plan.num_out, 1)
    return [(start, min(start + per_block, plan.num_out)) for start in range(0, plan.num_out, per_block)]


def _inverse_input_grad(plan: NeighbourPlan, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Input gradient of a non-symmetric plan: the column gradient summed back through the inverse table.

    Without groups the column GEMM writes straight into the padded scratch the scatter reads (no copy),
    and the scatter walks the inputs in blocks of about ``BLOCK_BYTES`` picked rows.
    """
    groups, volume, rows = weight.shape[0], plan.volume, grad_out.shape[0]
    channels = weight.shape[1] // volume * groups
    if groups == 1:
        padded = plan.scratch.take("padded", (rows * volume + 1, channels), grad_out)
        torch.mm(grad_out, weight[0].t(), out=padded[:-1].view(rows, volume * channels))
        padded[-1].zero_()
    else:
        padded = plan.padded(_column_grad(grad_out, weight, volume))
    return plan.scatter_padded(padded, _block_rows(plan.inverse.shape[1] * channels, grad_out))


def _gather_mm(plan: NeighbourPlan, rows: torch.Tensor, weight: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """``_grouped_mm(plan.gather(rows, reverse), weight)``, a block of output rows at a time."""
    padded = plan.padded(rows)
    blocks = _output_blocks(plan, rows.shape[1], rows)
    if len(blocks) == 1:
        return _grouped_mm(plan.gather_rows(padded, 0, plan.num_out, reverse), weight, plan.volume)
    groups = weight.shape[0]
    out = rows.new_empty(plan.num_out, groups * weight.shape[2])
    for start, stop in blocks:
        columns = plan.gather_rows(padded, start, stop, reverse)
        if groups == 1:
            torch.mm(columns, weight[0], out=out[start:stop])
        else:
            out[start:stop] = _grouped_mm(columns, weight, plan.volume)
    return out


def _gather_weight_grad(plan: NeighbourPlan, rows: torch.Tensor, grad_out: torch.Tensor, groups: int) -> torch.Tensor:
    """``_grouped_weight_grad`` of the gathered rows, summed over blocks of output rows."""
    padded = plan.padded(rows)
    blocks = _output_blocks(plan, rows.shape[1], rows)
    if len(blocks) == 1:
        return _grouped_weight_grad(plan.gather_rows(padded, 0, plan.num_out), grad_out, groups, plan.volume)
    if groups == 1:  # accumulate [O, K*C] in place; returned transposed like _grouped_weight_grad
        grad = grad_out.new_zeros(grad_out.shape[1], plan.volume * rows.shape[1])
        for start, stop in blocks:
            grad.addmm_(grad_out[start:stop].t(), plan.gather_rows(padded, start, stop))
        return grad.unsqueeze(0).transpose(1, 2)
    grad = None
    for start, stop in blocks:
        columns = plan.gather_rows(padded, start, stop)
        part = _grouped_weight_grad(columns, grad_out[start:stop], groups, plan.volume)
        grad = part if grad is None else grad.add_(part)
    return grad


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _save_compute_inputs(ctx, features: torch.Tensor, weight: torch.Tensor, plan: NeighbourPlan):
    """Cast both inputs to the compute dtype (autocast's, if active) and keep what backward needs."""
    dtype = _compute_dtype(features.device, features.dtype)
    features_c, weight_c = features.to(dtype), weight.to(dtype)
    ctx.save_for_backward(features_c, weight_c)
    ctx.plan = plan
    ctx.dtypes = (features.dtype, weight.dtype)
    return features_c, weight_c


class _GatherConvFunction(Function):
    """Gather-GEMM convolution; ``weight`` is ``[groups, K*C_in_g, C_out_g]`` (ME's offset order)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, plan: NeighbourPlan) -> torch.Tensor:
        features_c, weight_c = _save_compute_inputs(ctx, features, weight, plan)
        with torch.autocast(features.device.type, enabled=False):
            return _gather_mm(plan, features_c, weight_c)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        features, weight = ctx.saved_tensors
        plan: NeighbourPlan = ctx.plan
        grad_features = grad_weight = None
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_out = grad_out.to(weight.dtype).contiguous()
            if ctx.needs_input_grad[1]:
                grad_weight = _gather_weight_grad(plan, features, grad_out, weight.shape[0])
                grad_weight = grad_weight.to(ctx.dtypes[1])
            if ctx.needs_input_grad[0]:
                if plan.symmetric:
                    taps = _transposed_taps(weight, plan.volume)
                    grad_features = _gather_mm(plan, grad_out, taps, reverse=True)
                else:
                    grad_features = _inverse_input_grad(plan, grad_out, weight)
                grad_features = grad_features.to(ctx.dtypes[0])
        return grad_features, grad_weight, None


class _DepthwiseFunction(Function):
    """Depthwise convolution as a weighted sum of neighbours; ``weight`` is ``[K, C]``."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, plan: NeighbourPlan) -> torch.Tensor:
        features_c, weight_c = _save_compute_inputs(ctx, features, weight, plan)
        with torch.autocast(features.device.type, enabled=False):
            if plan.grid is not None:
                return _depthwise_via_dense(features_c, weight_c, plan)
            return _weighted_neighbour_sum(features_c, weight_c, plan)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        features, weight = ctx.saved_tensors
        plan: NeighbourPlan = ctx.plan
        grad_features = grad_weight = None
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_out = grad_out.to(weight.dtype).contiguous()
            if ctx.needs_input_grad[1]:
                grad_weight = _depthwise_weight_grad(features, grad_out, plan).to(ctx.dtypes[1])
            if ctx.needs_input_grad[0]:
                if plan.grid is not None:  # stride 1: the input grad is the same conv with the flipped kernel
                    grad_features = _depthwise_via_dense(grad_out, weight.flip(0), plan)
                elif plan.symmetric:
                    grad_features = _weighted_neighbour_sum(grad_out, weight.flip(0), plan)
                else:
                    grad_features = _depthwise_input_grad(grad_out, weight, plan)
                grad_features = grad_features.to(ctx.dtypes[0])
        return grad_features, grad_weight, None


def _depthwise_via_dense(features: torch.Tensor, weight: torch.Tensor, plan: NeighbourPlan) -> torch.Tensor:
    """Stride-1 depthwise forward: scatter into a zero map, dense depthwise conv, gather the active sites.

    oneDNN's / cuDNN's depthwise kernels are so much faster than a ``k*k``-tap gather loop that
    they win even though they also compute the hidden sites; hidden inputs are zero, so the
    active outputs are exactly the submanifold ones. Used for the input gradient too (the same conv
    with the flipped kernel); the weight gradient stays a blocked sparse sum.
    """
    dims = len(plan.kernel)
    channels = features.shape[1]
    dense = features.new_zeros(math.prod(plan.grid), channels).index_copy_(0, plan.grid_rows, features)
    image = dense.view(*plan.grid, channels).permute(0, dims + 1, *range(1, dims + 1))  # channels-last view
    # ME tap order (first axis fastest) -> [C, 1, *kernel]
    kernel = weight.view(*reversed(plan.kernel), channels).permute(dims, *range(dims - 1, -1, -1)).unsqueeze(1)
    padding = tuple(d * (k // 2) for k, d in zip(plan.kernel, plan.dilation))
    conv = F.conv2d if dims == 2 else F.conv3d
    out = conv(image, kernel, None, 1, padding, plan.dilation, channels)
    return out.permute(0, *range(2, dims + 2), 1).reshape(-1, channels).index_select(0, plan.grid_rows)


def _row_blocks(num_rows: int, channels: int) -> list[tuple[int, int]]:
    """Row ranges whose ``[rows, C]`` slices stay cache-resident (~1 MB fp32) across all kernel taps."""
    block = max(256, (1 << 18) // max(channels, 1))
    return [(start, min(start + block, num_rows)) for start in range(0, num_rows, block)]


def _weighted_neighbour_sum(rows: torch.Tensor, weight: torch.Tensor, plan: NeighbourPlan) -> torch.Tensor:
    """``out[j] = sum_k rows[table[j, k]] * weight[k]``, a block of outputs at a time (memory-bound otherwise)."""
    padded = plan.padded(rows)
    out = rows.new_empty(plan.num_out, rows.shape[1])
    picked_all = plan.scratch.take("columns", (plan.num_out, rows.shape[1]), rows)
    for start, stop in _row_blocks(plan.num_out, rows.shape[1]):
        block, picked = out[start:stop], picked_all[: stop - start]
        for tap, column in enumerate(plan.columns[:, start:stop]):
            torch.index_select(padded, 0, column, out=picked)
            if tap == 0:
                torch.mul(picked, weight[0], out=block)
            else:
                block.addcmul_(picked, weight[tap])
    return out


def _depthwise_weight_grad(features: torch.Tensor, grad_out: torch.Tensor, plan: NeighbourPlan) -> torch.Tensor:
    """``grad[k] = sum_j features[table[j, k]] * grad_out[j]``, blocked like the forward."""
    padded = plan.padded(features)
    picked_all = plan.scratch.take("columns", (plan.num_out, features.shape[1]), features)
    grad = features.new_zeros(plan.volume, features.shape[1])
    for start, stop in _row_blocks(plan.num_out, features.shape[1]):
        grad_block, picked = grad_out[start:stop], picked_all[: stop - start]
        for tap, column in enumerate(plan.columns[:, start:stop]):
            torch.index_select(padded, 0, column, out=picked)
            grad[tap] += picked.mul_(grad_block).sum(0)
    return grad


def _depthwise_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, plan: NeighbourPlan) -> torch.Tensor:
    inverse = plan.inverse
    volume = plan.volume
    padded = torch.cat([grad_out, grad_out.new_zeros(1, grad_out.shape[1])])
    taps = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
    out_rows = torch.div(inverse, volume, rounding_mode="floor")
    offsets = torch.where(inverse < plan.num_out * volume, inverse % volume, volume)
    grad = grad_out.new_zeros(plan.num_in, grad_out.shape[1])
    for slot in range(inverse.shape[1]):
        grad.addcmul_(padded.index_select(0, out_rows[:, slot]), taps.index_select(0, offsets[:, slot]))
    return grad


def _check(x: ME.SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> None:
    if x.D not in (2, 3):
        raise ValueError(f"the gather backend supports 2-D and 3-D sparse tensors, got dimension {x.D}")
    if weight.dim() != 2 + x.D:
        raise ValueError(
            f"weight must be [out, in // groups, *kernel] like nn.Conv{x.D}d, got shape {tuple(weight.shape)}"
        )
    out_channels, in_per_group = weight.shape[:2]
    if groups < 1 or out_channels % groups:
        raise ValueError(f"groups={groups} must divide the {out_channels} output channels")
    if x.F.shape[1] != in_per_group * groups:
        raise ValueError(
            f"input has {x.F.shape[1]} channels but the weight expects {in_per_group} x {groups} groups "
            f"= {in_per_group * groups}"
        )
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")


def gather_conv(
    x: ME.SparseTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> ME.SparseTensor:
    """Sparse 2-D / 3-D convolution with ``nn.Conv2d`` / ``nn.Conv3d``-layout ``weight``; same sites and
    values as ME's."""
    _check(x, weight, bias, groups)
    stride, dilation = tuple(int(s) for s in stride), tuple(int(d) for d in dilation)
    out_channels, in_per_group, *kernel = weight.shape
    dims, volume = len(kernel), math.prod(kernel)
    manager = x.coordinate_manager
    out_key = output_key(x, stride)
    features = x.F
    if volume == 1 and all(s == 1 for s in stride):
        out = _pointwise(features, weight, groups)
    else:
        plan = neighbour_plan(x, out_key, tuple(kernel), dilation, stride)
        if groups > 1 and in_per_group == 1 and out_channels == groups:
            spatial_reversed = range(dims, 0, -1)  # ME's tap order: first spatial axis fastest
            taps = weight.reshape(out_channels, *kernel).permute(*spatial_reversed, 0).reshape(volume, out_channels)
            out = _DepthwiseFunction.apply(features, taps, plan)
        else:
            out = _GatherConvFunction.apply(features, _conv_matrix(weight, groups), plan)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=manager)


def _conv_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``nn.ConvNd`` weight ``[O, C_g, *kernel]`` as the GEMM matrix ``[groups, K*C_g, O_g]`` (ME's offset order).

    Stored ``[groups, O_g, K*C_g]`` and returned transposed (a view; BLAS takes transposed operands
    for free): building it only reorders each output channel's ``C_g x K`` block, where the
    ``[K*C_g, O_g]`` layout would need a full, cache-hostile transpose of the weight every step.
    """
    out_channels, in_per_group, *kernel = weight.shape
    out_g, dims = out_channels // groups, len(kernel)
    stored = weight.view(groups, out_g, in_per_group, *kernel).permute(0, 1, *range(dims + 2, 2, -1), 2)
    return stored.reshape(groups, out_g, math.prod(kernel) * in_per_group).transpose(1, 2)


def _pointwise(features: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    matrix = weight.view(weight.shape[0], weight.shape[1])
    if groups == 1:
        return features @ matrix.t()
    rows = features.shape[0]
    per_group = features.view(rows, groups, -1).transpose(0, 1)
    out = torch.bmm(per_group, matrix.view(groups, -1, matrix.shape[1]).transpose(1, 2))
    return out.transpose(0, 1).reshape(rows, -1)


register_backend("gather", gather_conv, autocast=True)
