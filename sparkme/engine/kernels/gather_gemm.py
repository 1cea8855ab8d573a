"""Fused gather-GEMM kernels in Triton: a sparse convolution without an im2col buffer.

``gather_gemm`` computes ``out[j] = sum_k rows[table[j, k]] @ weight[k]`` with each neighbour row
gathered straight into the GEMM tile (a missing neighbour, ``table[j, k] == missing``, is masked
out); ``gather_weight_grad`` computes ``grad[k] = sum_j rows[table[j, k]]^T @ grad_out[j]``. Both
accumulate in fp32 whatever the input dtype (fp32, fp16, bf16) and write the caller's dtype.

The same forward kernel serves the input gradient: a convolution's transposed relation is another
neighbour table (the per-offset inverse, :func:`transposed_table`, or for a symmetric plan the
table itself read in reverse offset order) applied with each offset's matrix transposed, which is
only a stride swap here. No scatter, no atomics: deterministic.

Triton decides at ``triton.jit`` time whether a kernel is compiled or run by its CPU interpreter
(``TRITON_INTERPRET=1``), so the kernels are wrapped on first use, once per mode. They call only
``triton.language.core`` builtins (``tl.full``, not ``tl.zeros``): the ``tl`` helpers that are
themselves ``@triton.jit`` functions were wrapped when triton was imported, and refuse to run in the
interpreter if that happened before ``TRITON_INTERPRET=1`` was set.
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

__all__ = [
    "gather_gemm",
    "gather_weight_grad",
    "gemm_config",
    "interpreting",
    "launch_options",
    "transposed_table",
    "weight_grad_config",
]


def _gather_gemm_kernel(
    out_ptr, rows_ptr, table_ptr, weight_ptr,
    num_out, in_channels, out_channels, volume, missing,
    stride_rows, stride_table, stride_wk, stride_wc, stride_wo, stride_out,
    REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    outputs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, BLOCK_K)
    out_ok = outputs < num_out
    col_ok = cols < out_channels
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    chan_blocks = (in_channels + BLOCK_K - 1) // BLOCK_K
    for step in range(volume * chan_blocks):  # one flat loop over (offset, channel block): one pipeline
        tap = step // chan_blocks
        chans = (step % chan_blocks) * BLOCK_K + lanes
        column = volume - 1 - tap if REVERSE else tap
        source = tl.load(table_ptr + outputs.to(tl.int64) * stride_table + column, mask=out_ok, other=missing)
        present = source < missing
        chan_ok = chans < in_channels
        a = tl.load(
            rows_ptr + source.to(tl.int64)[:, None] * stride_rows + chans[None, :],
            mask=present[:, None] & chan_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            weight_ptr + tap * stride_wk + chans[:, None] * stride_wc + cols[None, :] * stride_wo,
            mask=chan_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    target = out_ptr + outputs.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(target, acc.to(out_ptr.dtype.element_ty), mask=out_ok[:, None] & col_ok[None, :])


def _weight_grad_kernel(
    partial_ptr, rows_ptr, table_ptr, grad_ptr,
    num_out, in_channels, out_channels, volume, missing, rows_per_split,
    stride_rows, stride_table, stride_grad,
    PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    chan_blocks = (in_channels + BLOCK_C - 1) // BLOCK_C
    tap = tl.program_id(0) // chan_blocks
    chans = (tl.program_id(0) % chan_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    split = tl.program_id(2)
    chan_ok = chans < in_channels
    col_ok = cols < out_channels
    lanes = tl.arange(0, BLOCK_J)
    begin = split * rows_per_split
    end = tl.minimum(begin + rows_per_split, num_out)
    acc = tl.full((BLOCK_C, BLOCK_O), 0.0, tl.float32)
    for start in range(begin, end, BLOCK_J):
        outputs = start + lanes
        out_ok = outputs < end
        source = tl.load(table_ptr + outputs.to(tl.int64) * stride_table + tap, mask=out_ok, other=missing)
        present = source < missing
        a = tl.load(
            rows_ptr + source.to(tl.int64)[:, None] * stride_rows + chans[None, :],
            mask=present[:, None] & chan_ok[None, :],
            other=0.0,
        )
        g = tl.load(
            grad_ptr + outputs.to(tl.int64)[:, None] * stride_grad + cols[None, :],
            mask=out_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
    tap_base = partial_ptr + (split.to(tl.int64) * volume + tap) * in_channels * out_channels
    target = tap_base + chans[:, None] * out_channels + cols[None, :]
    tl.store(target, acc, mask=chan_ok[:, None] & col_ok[None, :])


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


@functools.cache
def _compiled(interpret: bool) -> SimpleNamespace:
    """The kernels wrapped by ``triton.jit`` in the mode ``interpret`` (read by the wrapper itself)."""
    assert interpret == interpreting()
    return SimpleNamespace(gemm=triton.jit(_gather_gemm_kernel), weight_grad=triton.jit(_weight_grad_kernel))


def _kernels() -> SimpleNamespace:
    return _compiled(interpreting())


def _precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's TF32 switch (off by default: exact fp32 products like cuBLAS)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _block(size: int, smallest: int, largest: int) -> int:
    return max(smallest, min(largest, triton.next_power_of_2(size)))


def gemm_config(num_out: int, in_channels: int, out_channels: int, dtype: torch.dtype) -> dict:
    """Tile sizes of :func:`gather_gemm` (a ``BLOCK_K`` of at least 16: ``tl.dot``'s smallest)."""
    return {
        "PRECISION": _precision(dtype),
        "BLOCK_M": _block(num_out, 16, 128),
        "BLOCK_N": _block(out_channels, 16, 128),
        "BLOCK_K": _block(in_channels, 16, 64 if dtype.itemsize < 4 else 32),
    }


def weight_grad_config(in_channels: int, out_channels: int, dtype: torch.dtype) -> dict:
    """Tile sizes of :func:`gather_weight_grad`."""
    return {
        "PRECISION": _precision(dtype),
        "BLOCK_C": _block(in_channels, 16, 64),
        "BLOCK_O": _block(out_channels, 16, 64),
        "BLOCK_J": 64 if dtype.itemsize < 4 else 32,
    }


def launch_options(dtype: torch.dtype) -> dict[str, int]:
    """Warps and pipeline stages on the GPU (the interpreter takes neither)."""
    return {} if interpreting() else {"num_warps": 4, "num_stages": 3 if dtype == torch.float32 else 4}


def _on(device: torch.device):
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def gather_gemm(
    rows: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, missing: int, reverse: bool = False
) -> torch.Tensor:
    """``[len(table), O]``: ``sum_k rows[table[:, k']] @ weight[k]`` with ``k' = K-1-k`` if ``reverse``.

    ``rows`` is ``[*, C]`` (contiguous), ``table`` ``[N, K]`` int64 with ``missing`` for no neighbour,
    ``weight`` ``[K, C, O]`` with any strides (a transposed view works). Output in ``rows.dtype``.
    """
    volume, in_channels, out_channels = weight.shape
    assert table.shape[1] == volume and rows.shape[1] == in_channels and rows.stride(1) == 1
    num_out = table.shape[0]
    out = rows.new_empty(num_out, out_channels)
    config = gemm_config(num_out, in_channels, out_channels, rows.dtype)
    grid = (triton.cdiv(num_out, config["BLOCK_M"]), triton.cdiv(out_channels, config["BLOCK_N"]))
    with _on(rows.device):
        _kernels().gemm[grid](
            out, rows, table, weight,
            num_out, in_channels, out_channels, volume, missing,
            rows.stride(0), table.stride(0), *weight.stride(), out.stride(0),
            REVERSE=reverse, **config, **launch_options(rows.dtype),
        )  # fmt: skip
    return out


def gather_weight_grad(rows: torch.Tensor, table: torch.Tensor, grad_out: torch.Tensor, missing: int) -> torch.Tensor:
    """``[K, C, O]`` fp32: ``grad[k] = sum_j rows[table[j, k]]^T @ grad_out[j]``.

    The rows are split into chunks that run in parallel (a ``[K, C, O]`` grid alone is too small to
    fill a GPU); each chunk writes an fp32 partial sum and the partials are added in a fixed order.
    """
    num_out, volume = table.shape
    in_channels, out_channels = rows.shape[1], grad_out.shape[1]
    config = weight_grad_config(in_channels, out_channels, rows.dtype)
    block_c, block_o, block_j = config["BLOCK_C"], config["BLOCK_O"], config["BLOCK_J"]
    tiles = volume * triton.cdiv(in_channels, block_c) * triton.cdiv(out_channels, block_o)
    splits = max(1, min(triton.cdiv(num_out, 4 * block_j), triton.cdiv(1024, tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(num_out, splits), block_j) * block_j
    splits = max(1, triton.cdiv(num_out, rows_per_split))
    partial = torch.empty(splits, volume, in_channels, out_channels, dtype=torch.float32, device=rows.device)
    grid = (volume * triton.cdiv(in_channels, block_c), triton.cdiv(out_channels, block_o), splits)
    with _on(rows.device):
        _kernels().weight_grad[grid](
            partial, rows, table, grad_out,
            num_out, in_channels, out_channels, volume, missing, rows_per_split,
            rows.stride(0), table.stride(0), grad_out.stride(0),
            **config, **launch_options(rows.dtype),
        )  # fmt: skip
    return partial.sum(0) if splits > 1 else partial[0]


def transposed_table(table: torch.Tensor, num_in: int) -> torch.Tensor:
    """``[num_in, K]``: the output that input ``i`` feeds through offset ``k`` (``len(table)`` if none).

    For a fixed offset the output -> input map is a translation, so each (input, offset) pair feeds
    at most one output and the inverse is again a neighbour table.
    """
    num_out, volume = table.shape
    inverse = torch.full((num_in + 1, volume), num_out, dtype=table.dtype, device=table.device)
    outputs = torch.arange(num_out, dtype=table.dtype, device=table.device).unsqueeze(1).expand(num_out, volume)
    offsets = torch.arange(volume, device=table.device).expand(num_out, volume)
    inverse[table, offsets] = outputs  # missing neighbours land in the spare last row
    return inverse[:num_in]
