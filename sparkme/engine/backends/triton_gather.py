"""Fused gather-GEMM sparse convolution in Triton for CUDA tensors (backend ``"triton"``).

The gather backend materialises every output's ``k*k`` neighbours as an ``[N_out, k*k*C_in]``
buffer before one GEMM; here each neighbour row is loaded straight into the GEMM tile
(``kernels/gather_gemm.py``), so nothing of that size is written or read back:

- forward: ``out[j] = sum_k features[table[j, k]] @ W[k]`` (MinkowskiEngine's kernel map as the
  gather backend's ``NeighbourPlan``; a missing neighbour is a masked load);
- input gradient: the same kernel on the output gradient through the transposed relation (the
  plan's table in reverse offset order for stride-1 odd kernels, else the per-offset inverse
  table), each offset's matrix transposed by a stride swap; no scatter, no atomics;
- weight gradient: per offset, gathered ``features^T @ grad_out``, accumulated in fp32.

Inputs may be fp32, fp16 or bf16 (autocast's dtype when the caller runs under ``torch.autocast``);
products accumulate in fp32. fp32 GEMMs use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set, like cuBLAS. float64, grouped and depthwise
convolutions and 1x1 stride-1 convolutions (a plain GEMM) run the gather backend's code. CPU
tensors are refused unless ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests). Triton
is imported on first use, so this module imports without it.
"""

from __future__ import annotations

import os

import MinkowskiEngine as ME
import torch
from torch.autograd import Function

from . import register_backend
from .gather import _check, _compute_dtype, gather_conv
from .minkowski import offset_matrices as conv_matrix
from .neighbours import NeighbourPlan, neighbour_plan, output_key

__all__ = ["KERNEL_DTYPES", "conv_matrix", "triton_conv"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 runs the gather backend's code


def _kernels():
    """The kernel module, imported on first use (a clear error where Triton is missing)."""
    try:
        from ..kernels import gather_gemm
    except ImportError as err:
        raise RuntimeError(f"the 'triton' sparse backend needs Triton ({err}); use backend='gather'") from err
    return gather_gemm


def _require_device(features: torch.Tensor) -> None:
    if features.is_cuda or (os.environ.get("TRITON_INTERPRET") and _kernels().interpreting()):
        return
    raise RuntimeError(
        f"the 'triton' sparse backend runs on CUDA tensors, got {features.device} features; use backend='gather' "
        "on the CPU (TRITON_INTERPRET=1 runs its kernels in Triton's CPU interpreter, for tests only)"
    )


class _TritonConvFunction(Function):
    """Fused gather-GEMM convolution; ``matrix`` is ``[K, C_in, C_out]`` in ME's offset order."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, matrix: torch.Tensor, plan: NeighbourPlan) -> torch.Tensor:
        dtype = _compute_dtype(features.device, features.dtype)
        features_c, matrix_c = features.to(dtype).contiguous(), matrix.to(dtype).contiguous()
        ctx.save_for_backward(features_c, matrix_c)
        ctx.plan = plan
        ctx.dtypes = (features.dtype, matrix.dtype)
        return _kernels().gather_gemm(features_c, plan.table, matrix_c, plan.num_in)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        features, matrix = ctx.saved_tensors
        plan: NeighbourPlan = ctx.plan
        kernels = _kernels()
        grad_out = grad_out.to(matrix.dtype).contiguous()
        grad_features = grad_matrix = None
        if ctx.needs_input_grad[1]:
            grad_matrix = kernels.gather_weight_grad(features, plan.table, grad_out, plan.num_in).to(ctx.dtypes[1])
        if ctx.needs_input_grad[0]:
            taps = matrix.transpose(1, 2)  # [K, C_out, C_in]: each offset's matrix transposed, a view
            if plan.symmetric:
                grad_features = kernels.gather_gemm(grad_out, plan.table, taps, plan.num_out, reverse=True)
            else:
                inverse = kernels.transposed_table(plan.table, plan.num_in)
                grad_features = kernels.gather_gemm(grad_out, inverse, taps, plan.num_out)
            grad_features = grad_features.to(ctx.dtypes[0])
        return grad_features, grad_matrix, None


def triton_conv(
    x: ME.SparseTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> ME.SparseTensor:
    """Sparse 2-D convolution with ``nn.Conv2d``-layout ``weight``; same sites and values as ME's."""
    stride, dilation = tuple(int(s) for s in stride), tuple(int(d) for d in dilation)
    _require_device(x.F)
    pointwise = weight.dim() == 4 and weight.shape[2:].numel() == 1 and stride == (1, 1)
    dtype = _compute_dtype(x.F.device, x.F.dtype)
    if x.D != 2 or weight.dim() != 4 or groups != 1 or pointwise or dtype not in KERNEL_DTYPES:
        return gather_conv(x, weight, bias, stride=stride, dilation=dilation, groups=groups)
    _check(x, weight, bias, groups)
    kh, kw = weight.shape[2:]
    manager = x.coordinate_manager
    out_key = output_key(x, stride)
    plan = neighbour_plan(x, out_key, (kh, kw), dilation, stride)
    out = _TritonConvFunction.apply(x.F, conv_matrix(weight), plan)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=manager)


register_backend("triton", triton_conv, autocast=True)
