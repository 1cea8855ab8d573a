"""Neighbour tables of the gather backend: which input row feeds each output site through each offset.

Built once from MinkowskiEngine's kernel map and cached per coordinate manager (weakly: a table
dies with its batch's manager) and per (input map, output map, kernel, dilation), so every layer
of a stage and the backward pass reuse it. A plan also owns the gather and its adjoint scatter,
and shares one set of scratch buffers per manager.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import MinkowskiEngine as ME
import torch

from ..context import key_id

__all__ = ["NeighbourPlan", "Scratch", "neighbour_plan", "output_key"]

_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class NeighbourPlan:
    """Which input row feeds each output site through each kernel offset.

    ``table[j, k]`` is the input row seen by output ``j`` through kernel offset ``k`` (ME's
    offset order: first spatial axis fastest), or ``num_in`` (a zero row) when missing.
    """

    table: torch.Tensor  # [num_out, volume] int64
    num_in: int
    symmetric: bool  # stride 1, odd kernel: input-grad is the flipped-kernel convolution
    scratch: Scratch = field(default_factory=lambda: Scratch(), repr=False)
    kernel: tuple[int, ...] = (1, 1)
    dilation: tuple[int, ...] = (1, 1)
    grid: tuple[int, ...] | None = None  # (B, *spatial) of the input sites' dense grid (stride-1 plans)
    grid_rows: torch.Tensor | None = field(default=None, repr=False)  # [num_in] flat index into the grid
    _inverse: torch.Tensor | None = field(default=None, repr=False)
    _columns: torch.Tensor | None = field(default=None, repr=False)
    _reversed: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_out(self) -> int:
        return self.table.shape[0]

    @property
    def volume(self) -> int:
        return self.table.shape[1]

    @property
    def columns(self) -> torch.Tensor:
        """``table`` transposed and contiguous: one index vector per kernel offset."""
        if self._columns is None:
            self._columns = self.table.t().contiguous()
        return self._columns

    @property
    def inverse(self) -> torch.Tensor:
        """``[num_in, M]`` rows ``j * volume + k`` of the outputs each input feeds (``num_out * volume`` if none)."""
        if self._inverse is None:
            self._inverse = _invert(self.table, self.num_in)
        return self._inverse

    def padded(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` with a zero row appended (index ``len(rows)``), in scratch memory."""
        padded = self.scratch.take("padded", (rows.shape[0] + 1, rows.shape[1]), rows)
        padded[:-1].copy_(rows)
        padded[-1].zero_()
        return padded

    def gather(self, rows: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """``[num_out, volume * C]``: each output's neighbour rows side by side (zeros where missing).

        ``reverse``: kernel offsets in reverse order (the flipped kernel of a symmetric plan's input
        gradient, so that the weight needs no flip). The result lives in scratch memory: consume it
        before the next ``gather``/``scatter``.
        """
        return self.gather_rows(self.padded(rows), 0, self.num_out, reverse)

    def gather_rows(self, padded: torch.Tensor, start: int, stop: int, reverse: bool = False) -> torch.Tensor:
        """``gather`` of outputs ``start:stop`` only, from ``padded(rows)`` (the caller pads once).

        ``[stop - start, volume * C]`` in scratch memory sized to the block, so a caller that walks the
        outputs in blocks never holds the whole ``[num_out, volume * C]`` matrix.
        """
        table = self.table
        if reverse:
            if self._reversed is None:
                self._reversed = table.flip(1).contiguous()
            table = self._reversed
        index = table[start:stop].reshape(-1)
        columns = self.scratch.take("columns", (index.numel(), padded.shape[1]), padded)
        torch.index_select(padded, 0, index, out=columns)
        return columns.view(stop - start, -1)

    def scatter(self, columns: torch.Tensor, block_rows: int | None = None) -> torch.Tensor:
        """Adjoint of ``gather``: sum ``[num_out * volume, C]`` rows back onto the ``num_in`` inputs."""
        return self.scatter_padded(self.padded(columns), block_rows)

    def scatter_padded(self, padded: torch.Tensor, block_rows: int | None = None) -> torch.Tensor:
        """``scatter`` of ``padded`` (``[num_out * volume + 1, C]``, the last row zero), ``block_rows``
        inputs at a time (``None``: all at once), so the picked rows' scratch stays bounded."""
        inverse = self.inverse
        width, channels = inverse.shape[1], padded.shape[1]
        out = padded.new_empty(self.num_in, channels)
        step = max(block_rows or self.num_in, 1)
        for start in range(0, self.num_in, step):
            stop = min(start + step, self.num_in)
            picked = self.scratch.take("columns", ((stop - start) * width, channels), padded)
            torch.index_select(padded, 0, inverse[start:stop].reshape(-1), out=picked)
            torch.sum(picked.view(stop - start, width, channels), 1, out=out[start:stop])
        return out


class Scratch:
    """Reusable CPU buffers for one batch's gathers, shared by all layers on a coordinate manager.

    A fresh 10-100 MB CPU tensor page-faults on every call (glibc returns big blocks to the OS),
    which costs as much as the gather itself; CUDA's caching allocator needs no help.
    """

    pooled_devices: tuple[str, ...] = ("cpu",)  # elsewhere (CUDA) every take is a fresh allocation

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised ``shape`` tensor; valid until the next ``take`` of the same ``slot``."""
        if like.device.type not in self.pooled_devices:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        numel = shape[0] * shape[1]
        buffer = self._buffers.get((slot, like.dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=like.dtype)
            self._buffers[(slot, like.dtype)] = buffer
        return buffer[:numel].view(shape)


def _invert(table: torch.Tensor, num_in: int) -> torch.Tensor:
    num_out, volume = table.shape
    flat = table.view(-1)
    valid = flat < num_in
    source = flat[valid]
    rows = torch.arange(flat.numel(), device=table.device)[valid]
    order = torch.argsort(source, stable=True)
    source, rows = source[order], rows[order]
    counts = torch.bincount(source, minlength=num_in)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(source.numel(), device=table.device) - starts[source]
    inverse = torch.full((num_in, width), num_out * volume, dtype=torch.long, device=table.device)
    inverse[source, slot] = rows
    return inverse


def output_key(x: ME.SparseTensor, stride: tuple[int, ...]) -> object:
    """The coordinate key a convolution of ``stride`` writes: ``x``'s own sites at stride 1, else the
    stride cells holding an active site (MinkowskiEngine's strided map)."""
    if all(s == 1 for s in stride):
        return x.coordinate_map_key
    return x.coordinate_manager.stride(x.coordinate_map_key, list(stride))


def neighbour_plan(
    x: ME.SparseTensor,
    out_key: object,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
) -> NeighbourPlan:
    """The (cached) neighbour table from ``x``'s coordinates to ``out_key``'s, from ME's kernel map."""
    manager = x.coordinate_manager
    cache = _PLANS.setdefault(manager, {"scratch": Scratch()})
    in_key = x.coordinate_map_key
    cache_key = (key_id(in_key), key_id(out_key), kernel, dilation, x.device)
    plan = cache.get(cache_key)
    if plan is None:
        kernel_map = manager.kernel_map(
            in_key, out_key, stride=list(stride), kernel_size=list(kernel), dilation=list(dilation)
        )
        num_in, num_out = manager.size(in_key), manager.size(out_key)
        volume = math.prod(kernel)
        table = torch.full((num_out * volume,), num_in, dtype=torch.long, device=x.device)
        if kernel_map:  # one scatter for all offsets (few large ops: cheap on busy, few-core CPUs)
            offsets = list(kernel_map)
            in_out = torch.cat([kernel_map[k] for k in offsets], 1).to(device=x.device, dtype=torch.long)
            counts = torch.tensor([kernel_map[k].shape[1] for k in offsets], device=x.device)
            offset_of = torch.repeat_interleave(torch.tensor(offsets, device=x.device), counts)
            table[in_out[1] * volume + offset_of] = in_out[0]
        table = table.view(num_out, volume)
        symmetric = all(s == 1 for s in stride) and all(k % 2 == 1 for k in kernel) and num_in == num_out
        plan = NeighbourPlan(
            table=table, num_in=num_in, symmetric=symmetric, scratch=cache["scratch"], kernel=kernel, dilation=dilation
        )
        if symmetric:
            plan.grid, plan.grid_rows = _dense_grid(manager, in_key, x.device)
        cache[cache_key] = plan
    return plan


def _dense_grid(manager: object, key: object, device: torch.device) -> tuple[tuple[int, ...], torch.Tensor]:
    """Where each site of ``key`` sits in a dense ``[B, *spatial]`` grid at the key's own stride."""
    coordinates = manager.get_coordinates(key).to(device=device, dtype=torch.long)
    stride = key.get_key()[0]
    axes = [coordinates[:, 0]] + [coordinates[:, 1 + i] // s for i, s in enumerate(stride)]
    grid = tuple(int(axis.max()) + 1 for axis in axes)
    rows = axes[0]
    for axis, side in zip(axes[1:], grid[1:]):
        rows = rows * side + axis
    return grid, rows
