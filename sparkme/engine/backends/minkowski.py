"""The "minkowski" backend: MinkowskiEngine's stock convolution kernels.

Dense ``Conv2d`` weights ``[out, in // groups, kh, kw]`` are used as they are (no copy kept):
the Minkowski kernel is ``W.permute(3, 2, 1, 0).reshape(kh * kw, in, out)`` because ME
enumerates kernel offsets with the first spatial axis (y) varying fastest (``Conv3d``: the spatial
axes reversed the same way, ``W.permute(4, 3, 2, 1, 0)``). 1x1 stride-1
convolutions are a plain ``mm``. ME has no groups: grouped and depthwise convolutions run on
ME's kernel map (which input site feeds which output site for each offset), the same scheme
``MinkowskiChannelwiseConvolution`` uses, with one gather and one ``index_add`` for all offsets.
"""

from __future__ import annotations

import math

import torch

from . import register_backend
from .neighbours import output_key

__all__ = ["minkowski_conv", "offset_matrices"]


def _reversed_spatial(dims: int) -> range:
    """A weight's spatial axes, last first: ME enumerates kernel offsets with the first axis fastest."""
    return range(dims + 1, 1, -1)


def offset_matrices(weight: torch.Tensor) -> torch.Tensor:
    """``nn.ConvNd`` weight ``[O, C, *kernel]`` (no groups) as one ``[C, O]`` matrix per kernel offset,
    ``[K, C, O]`` in ME's offset order: MinkowskiEngine's kernel layout."""
    out_channels, in_channels = weight.shape[:2]
    return weight.permute(*_reversed_spatial(weight.dim() - 2), 1, 0).reshape(-1, in_channels, out_channels)


def _grouped(x, weight: torch.Tensor, out_key, stride, dilation, groups: int) -> torch.Tensor:
    out_channels, in_per_group, *kernel = weight.shape
    out_per_group, volume = out_channels // groups, math.prod(kernel)
    manager = x.coordinate_manager
    kernel_map = manager.kernel_map(
        x.coordinate_map_key, out_key, stride=list(stride), kernel_size=kernel, dilation=list(dilation)
    )
    features = x.F
    # kernel offset index k = ix * kh + iy  ->  weight[..., iy, ix] (first spatial axis fastest, any rank)
    per_offset = weight.permute(*_reversed_spatial(len(kernel)), 0, 1).reshape(
        volume, groups, out_per_group, in_per_group
    )
    out = features.new_zeros(manager.size(out_key), out_channels)
    if in_per_group == 1 and out_per_group == 1:  # depthwise: one gather, one scale, one scatter
        offsets = sorted(kernel_map)
        maps = [kernel_map[k].long().to(features.device) for k in offsets]
        in_rows = torch.cat([m[0] for m in maps])
        out_rows = torch.cat([m[1] for m in maps])
        which = torch.cat(
            [torch.full((m.shape[1],), k, dtype=torch.long, device=features.device) for k, m in zip(offsets, maps)]
        )
        scale = per_offset.reshape(volume, out_channels).index_select(0, which)
        return out.index_add(0, out_rows, features.index_select(0, in_rows) * scale)
    for offset, rows in kernel_map.items():
        rows = rows.long().to(features.device)
        source = features.index_select(0, rows[0]).reshape(-1, groups, in_per_group)
        contribution = torch.einsum("ngi,goi->ngo", source, per_offset[offset]).reshape(-1, out_channels)
        out = out.index_add(0, rows[1], contribution)
    return out


def minkowski_conv(
    x,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
):
    """Submanifold (stride 1) or strided sparse convolution with dense-layout weights."""
    import MinkowskiEngine as ME
    from MinkowskiEngineBackend._C import ConvolutionMode

    out_channels, in_per_group, *size = weight.shape
    stride, dilation, dims = tuple(stride), tuple(dilation), len(size)
    out_key = output_key(x, stride)
    if groups == 1 and math.prod(size) == 1 and all(s == 1 for s in stride):
        out = x.F.mm(weight.reshape(out_channels, in_per_group).t())
    elif groups == 1:
        kernel = offset_matrices(weight).contiguous()
        generator = ME.KernelGenerator(kernel_size=size, stride=list(stride), dilation=list(dilation), dimension=dims)
        out = ME.MinkowskiConvolutionFunction.apply(
            x.F, kernel, generator, ConvolutionMode.DEFAULT, x.coordinate_map_key, out_key, x.coordinate_manager
        )
    else:
        out = _grouped(x, weight, out_key, stride, dilation, groups)
    if bias is not None:
        out = out + bias
    return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=x.coordinate_manager)


register_backend("minkowski", minkowski_conv)
