"""Masked-dense emulation of a sparse CNN, with the official SparK semantics (the baseline to beat).

The SparK reference code (keyu-tian/SparK, ``encoder.py``) never builds sparse tensors: it runs
every dense op on the full map and re-masks. We reproduce it on any timm CNN by swapping the
class of each spatial module in place (weights, hooks and state-dict keys stay as they are):

- convolutions and poolings: dense op, then multiply by the visible map at that resolution;
- BatchNorm: gather the visible sites, BatchNorm over them only, scatter into zeros;
- InstanceNorm3d (no running statistics): per volume and channel over the visible voxels, re-masked;
- LayerNorm (channels-first ``LayerNorm2d`` or channels-last on ``[B, H, W, C]``): per site, so
  normalized everywhere and re-masked (the same values as SparK's gather-LN-scatter, cheaper);
- ``nn.Linear`` on ``[B, H, W, C]`` (ConvNeXt's MLP): re-masked, so hidden sites stay exactly
  zero (SparK's own ConvNeXt let the MLP biases leak into hidden sites; the sparse engine does not).

Images (``Conv2d``, ``BatchNorm2d``, ``Max/AvgPool2d``, LayerNorms, ``Linear``) and volumes (``Conv3d``,
``BatchNorm3d``, ``InstanceNorm3d``, ``Max/AvgPool3d``: sparkme's ``ResNet3d``) are covered. Max pooling
follows the official code (dense pool, then re-mask): hidden neighbours count as zeros, which equals the
sparse engine's max over visible sites after a ReLU. Modules that mix sites in other ways (GroupNorm,
GRN, global pooling, attention, InstanceNorm with running statistics) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerNorm2d
from torch import nn

__all__ = ["VisibleMaps", "to_masked_dense", "MaskedDenseEncoder", "DenseEncoder", "UnsupportedForMaskedDense"]


class UnsupportedForMaskedDense(ValueError):
    """A module whose masked-dense semantics are not defined here."""


class VisibleMaps:
    """The current batch's visible patches (or cubes), upsampled on demand to each feature map's size."""

    def __init__(self) -> None:
        self.patches: torch.Tensor | None = None  # bool [B, 1, h, w] or [B, 1, d, h, w]
        self._dense: dict[tuple, torch.Tensor] = {}
        self._sites: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def set(self, visible: torch.Tensor | None) -> None:
        self.patches = visible
        self._dense.clear()
        self._sites.clear()

    def _upsampled(self, sides: tuple[int, ...]) -> torch.Tensor:
        if self.patches is None:
            raise RuntimeError("masked-dense module called outside MaskedDenseEncoder.forward (no visible map set)")
        grid = tuple(self.patches.shape[2:])
        if len(sides) != len(grid) or any(side % cells for side, cells in zip(sides, grid)):
            size, cells = "x".join(map(str, sides)), "x".join(map(str, grid))
            raise ValueError(f"feature map {size} is not a multiple of the {cells} patch grid")
        out = self.patches
        for axis, (side, cells) in enumerate(zip(sides, grid), start=2):
            out = out.repeat_interleave(side // cells, axis)
        return out

    def dense(self, sides: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """``[B, 1, *sides]`` mask (1 visible, 0 hidden) in ``dtype``."""
        key = (*sides, dtype)
        if key not in self._dense:
            self._dense[key] = self._upsampled(tuple(sides)).to(dtype)
        return self._dense[key]

    def sites(self, sides: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """``(batch, y, x)`` (or ``(batch, z, y, x)``) index tensors of the visible sites (SparK's ``ii``)."""
        key = tuple(sides)
        if key not in self._sites:
            self._sites[key] = self._upsampled(key)[:, 0].nonzero(as_tuple=True)
        return self._sites[key]


class _Masked:
    visible: VisibleMaps

    def remask(self, out: torch.Tensor) -> torch.Tensor:
        """Zero the hidden sites of a channels-first map, in place."""
        return out.mul_(self.visible.dense(out.shape[2:], out.dtype))


def _gather_normalize_scatter(
    module: _Masked, x: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """SparK's sparse BatchNorm: gather the visible sites' rows, normalize them, scatter into zeros."""
    spatial = x.dim() - 2
    sites = module.visible.sites(x.shape[2:])
    channels_last = x.movedim(1, -1)
    rows = channels_last[sites]
    normed = norm(rows.view(*rows.shape, *(1,) * spatial)).flatten(1)
    out = torch.zeros_like(channels_last)
    out[sites] = normed.to(out.dtype)
    return out.movedim(-1, 1)


class MaskedConv2d(nn.Conv2d, _Masked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.remask(super().forward(x))


class MaskedMaxPool2d(nn.MaxPool2d, _Masked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.remask(super().forward(x))


class MaskedAvgPool2d(nn.AvgPool2d, _Masked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.remask(super().forward(x))


class MaskedBatchNorm2d(nn.BatchNorm2d, _Masked):
    """BatchNorm whose statistics (and running statistics) come from visible sites only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gather_normalize_scatter(self, x, super().forward)


class MaskedConv3d(nn.Conv3d, _Masked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.remask(super().forward(x))


class MaskedMaxPool3d(nn.MaxPool3d, _Masked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.remask(super().forward(x))


class MaskedAvgPool3d(nn.AvgPool3d, _Masked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.remask(super().forward(x))


class MaskedBatchNorm3d(nn.BatchNorm3d, _Masked):
    """BatchNorm3d whose statistics (and running statistics) come from visible voxels only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gather_normalize_scatter(self, x, super().forward)


class MaskedInstanceNorm3d(nn.InstanceNorm3d, _Masked):
    """InstanceNorm3d over each volume's visible voxels (biased variance, as torch), hidden voxels zeroed.

    Only without running statistics (``track_running_stats=False``, torch's default and ResNet3d's).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.visible.dense(x.shape[2:], x.dtype)
        space = tuple(range(2, x.dim()))
        count = mask.sum(space, keepdim=True).clamp(min=1)
        mean = (x * mask).sum(space, keepdim=True) / count
        centred = (x - mean) * mask
        var = centred.square().sum(space, keepdim=True) / count
        out = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            shape = (1, -1) + (1,) * len(space)
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out * mask


class MaskedLayerNorm2d(LayerNorm2d, _Masked):
    """Channels-first LayerNorm (timm ``LayerNorm2d``), hidden sites zeroed.

    LayerNorm is per site, so normalizing everything and re-masking gives SparK's gather-LN-scatter
    values exactly, without advanced indexing (whose backward is single-threaded on the CPU).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.remask(super().forward(x))


class MaskedLayerNorm(nn.LayerNorm, _Masked):
    """Channels-last LayerNorm on ``[B, H, W, C]``, hidden sites zeroed (per site: no gather needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if x.dim() != 4:
            return out
        return out.mul_(self.visible.dense(x.shape[1:3], out.dtype).permute(0, 2, 3, 1))


class MaskedLinear(nn.Linear, _Masked):
    """A Linear on ``[B, H, W, C]`` is a 1x1 convolution: re-mask so biases do not reach hidden sites."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if out.dim() != 4:
            return out
        mask = self.visible.dense(out.shape[1:3], out.dtype)
        return out.mul_(mask.permute(0, 2, 3, 1))


_SWAPS: dict[type, type] = {
    nn.Conv2d: MaskedConv2d,
    nn.MaxPool2d: MaskedMaxPool2d,
    nn.AvgPool2d: MaskedAvgPool2d,
    nn.BatchNorm2d: MaskedBatchNorm2d,
    nn.Conv3d: MaskedConv3d,
    nn.MaxPool3d: MaskedMaxPool3d,
    nn.AvgPool3d: MaskedAvgPool3d,
    nn.BatchNorm3d: MaskedBatchNorm3d,
    nn.InstanceNorm3d: MaskedInstanceNorm3d,
    LayerNorm2d: MaskedLayerNorm2d,
    LayerNorm: MaskedLayerNorm,
    nn.LayerNorm: MaskedLayerNorm,
    nn.Linear: MaskedLinear,
}
_REFUSED = (
    nn.Conv2d,  # subclasses (same-padding, weight-standardized...) that are not swapped above
    nn.Conv3d,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Linear,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool3d,
    nn.MultiheadAttention,
)

# timm blocks that pool over the whole map (SE, ECA, CBAM, GRN...) or attend across sites
_REFUSED_NAMES = (
    "GlobalResponseNorm",
    "Squeeze",
    "SEModule",
    "EffectiveSE",
    "Eca",
    "Cbam",
    "GatherExcite",
    "Attention",
)


def to_masked_dense(model: nn.Module, visible: VisibleMaps) -> nn.Module:
    """Turn ``model`` (in place) into its masked-dense twin reading the mask from ``visible``."""
    for name, module in model.named_modules():
        kind = type(module)
        masked_type = _SWAPS.get(kind)
        if masked_type is MaskedInstanceNorm3d and module.track_running_stats:
            raise UnsupportedForMaskedDense(
                f"{name or 'model'} is an InstanceNorm3d with running statistics: sparkme.benchmarks emulates "
                "InstanceNorm3d only with track_running_stats=False"
            )
        if masked_type is not None:
            module.__class__ = masked_type
            module.visible = visible
        elif isinstance(module, _REFUSED) or any(word in kind.__name__ for word in _REFUSED_NAMES):
            raise UnsupportedForMaskedDense(
                f"{name or 'model'} is a {kind.__name__}: sparkme.benchmarks has no masked-dense twin for it "
                f"(supported: {', '.join(t.__name__ for t in _SWAPS)}); benchmark a model without it"
            )
    return model


def _norm_kind(model: nn.Module) -> str:
    batch_statistics = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    return "bn" if any(isinstance(m, batch_statistics) for m in model.modules()) else "ln"


def _input_geometry(model: nn.Module) -> tuple[int, int]:
    """(spatial dims, input channels) of the first convolution."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no convolution: nothing to benchmark")
    return len(conv.kernel_size), conv.in_channels


class DenseEncoder(nn.Module):
    """A ``features_only`` backbone (timm's, or ``VolumeFeatures``) behind the sparse encoder's interface;
    ignores the mask."""

    def __init__(self, backbone: nn.Module, model_name: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_channels = list(backbone.feature_info.channels())
        self.feature_strides = list(backbone.feature_info.reduction())
        self.downsample_ratio = self.feature_strides[-1]
        self.norm_kind = _norm_kind(backbone)
        self.model_name = model_name
        self.spatial_dims, self.in_channels = _input_geometry(backbone)

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> list[torch.Tensor]:
        return list(self.backbone(images))


class MaskedDenseEncoder(DenseEncoder):
    """SparK's masked-dense encoder: hidden pixels (voxels) zeroed, every spatial op re-masked."""

    def __init__(self, backbone: nn.Module, model_name: str | None = None) -> None:
        super().__init__(backbone, model_name)
        self.visible = VisibleMaps()
        to_masked_dense(self.backbone, self.visible)

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> list[torch.Tensor]:
        if visible is None or visible.dtype != torch.bool or visible.dim() != self.spatial_dims + 2:
            layout = "[B, 1, d, h, w]" if self.spatial_dims == 3 else "[B, 1, h, w]"
            raise ValueError(f"visible must be a bool {layout} mask (True = visible) at patch resolution")
        self.visible.set(visible.to(images.device))
        try:
            mask = self.visible.dense(images.shape[2:], images.dtype)
            return list(self.backbone(images * mask))
        finally:
            self.visible.set(None)
