"""Masked-dense emulation of a sparse CNN, with the official SparK semantics (the baseline to beat).

The SparK reference code (keyu-tian/SparK, ``encoder.py``) never builds sparse tensors: it runs
every dense op on the full map and re-masks. We reproduce it on any timm CNN by swapping the
class of each spatial module in place (weights, hooks and state-dict keys stay as they are):

- convolutions and poolings: dense op, then multiply by the visible map at that resolution;
- BatchNorm: gather the visible sites, BatchNorm over them only, scatter into zeros;
- LayerNorm (channels-first ``LayerNorm2d`` or channels-last on ``[B, H, W, C]``): per site, so
  normalized everywhere and re-masked (the same values as SparK's gather-LN-scatter, cheaper);
- ``nn.Linear`` on ``[B, H, W, C]`` (ConvNeXt's MLP): re-masked, so hidden sites stay exactly
  zero (SparK's own ConvNeXt let the MLP biases leak into hidden sites; the sparse engine does not).

Modules that mix sites in other ways (GroupNorm, GRN, global pooling, attention) are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerNorm2d
from torch import nn

__all__ = ["VisibleMaps", "to_masked_dense", "MaskedDenseEncoder", "DenseEncoder", "UnsupportedForMaskedDense"]


class UnsupportedForMaskedDense(ValueError):
    """A module whose masked-dense semantics are not defined here."""


class VisibleMaps:
    """The current batch's visible patches, upsampled on demand to each feature map's size."""

    def __init__(self) -> None:
        self.patches: torch.Tensor | None = None  # bool [B, 1, h, w]
        self._dense: dict[tuple, torch.Tensor] = {}
        self._sites: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def set(self, visible: torch.Tensor | None) -> None:
        self.patches = visible
        self._dense.clear()
        self._sites.clear()

    def _upsampled(self, height: int, width: int) -> torch.Tensor:
        if self.patches is None:
            raise RuntimeError("masked-dense module called outside MaskedDenseEncoder.forward (no visible map set)")
        grid_h, grid_w = self.patches.shape[-2:]
        if height % grid_h or width % grid_w:
            raise ValueError(f"feature map {height}x{width} is not a multiple of the {grid_h}x{grid_w} patch grid")
        return self.patches.repeat_interleave(height // grid_h, 2).repeat_interleave(width // grid_w, 3)

    def dense(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """``[B, 1, H, W]`` mask (1 visible, 0 hidden) in ``dtype``."""
        key = (height, width, dtype)
        if key not in self._dense:
            self._dense[key] = self._upsampled(height, width).to(dtype)
        return self._dense[key]

    def sites(self, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """``(batch, y, x)`` index tensors of the visible sites at ``H x W`` (SparK's ``ii``)."""
        key = (height, width)
        if key not in self._sites:
            self._sites[key] = self._upsampled(height, width)[:, 0].nonzero(as_tuple=True)
        return self._sites[key]


class _Masked:
    visible: VisibleMaps


class MaskedConv2d(nn.Conv2d, _Masked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.mul_(self.visible.dense(out.shape[2], out.shape[3], out.dtype))


class MaskedMaxPool2d(nn.MaxPool2d, _Masked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.mul_(self.visible.dense(out.shape[2], out.shape[3], out.dtype))


class MaskedAvgPool2d(nn.AvgPool2d, _Masked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.mul_(self.visible.dense(out.shape[2], out.shape[3], out.dtype))


class MaskedBatchNorm2d(nn.BatchNorm2d, _Masked):
    """BatchNorm whose statistics (and running statistics) come from visible sites only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sites = self.visible.sites(x.shape[2], x.shape[3])
        bhwc = x.permute(0, 2, 3, 1)
        normed = super().forward(bhwc[sites][:, :, None, None])[:, :, 0, 0]
        out = torch.zeros_like(bhwc)
        out[sites] = normed.to(out.dtype)
        return out.permute(0, 3, 1, 2)


class MaskedLayerNorm2d(LayerNorm2d, _Masked):
    """Channels-first LayerNorm (timm ``LayerNorm2d``), hidden sites zeroed.

    LayerNorm is per site, so normalizing everything and re-masking gives SparK's gather-LN-scatter
    values exactly, without advanced indexing (whose backward is single-threaded on the CPU).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.mul_(self.visible.dense(out.shape[2], out.shape[3], out.dtype))


class MaskedLayerNorm(nn.LayerNorm, _Masked):
    """Channels-last LayerNorm on ``[B, H, W, C]``, hidden sites zeroed (per site: no gather needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if x.dim() != 4:
            return out
        return out.mul_(self.visible.dense(x.shape[1], x.shape[2], out.dtype).permute(0, 2, 3, 1))


class MaskedLinear(nn.Linear, _Masked):
    """A Linear on ``[B, H, W, C]`` is a 1x1 convolution: re-mask so biases do not reach hidden sites."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if out.dim() != 4:
            return out
        mask = self.visible.dense(out.shape[1], out.shape[2], out.dtype)
        return out.mul_(mask.permute(0, 2, 3, 1))


_SWAPS: dict[type, type] = {
    nn.Conv2d: MaskedConv2d,
    nn.MaxPool2d: MaskedMaxPool2d,
    nn.AvgPool2d: MaskedAvgPool2d,
    nn.BatchNorm2d: MaskedBatchNorm2d,
    LayerNorm2d: MaskedLayerNorm2d,
    LayerNorm: MaskedLayerNorm,
    nn.LayerNorm: MaskedLayerNorm,
    nn.Linear: MaskedLinear,
}
_REFUSED = (
    nn.Conv2d,  # subclasses (same-padding, weight-standardized...) that are not swapped above
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Linear,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
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
    return "bn" if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else "ln"


class DenseEncoder(nn.Module):
    """A timm ``features_only`` backbone behind the sparse encoder's interface; ignores the mask."""

    def __init__(self, backbone: nn.Module, model_name: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_channels = list(backbone.feature_info.channels())
        self.feature_strides = list(backbone.feature_info.reduction())
        self.downsample_ratio = self.feature_strides[-1]
        self.norm_kind = _norm_kind(backbone)
        self.model_name = model_name

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> list[torch.Tensor]:
        return list(self.backbone(images))


class MaskedDenseEncoder(DenseEncoder):
    """SparK's masked-dense encoder: hidden pixels zeroed, every spatial op re-masked."""

    def __init__(self, backbone: nn.Module, model_name: str | None = None) -> None:
        super().__init__(backbone, model_name)
        self.visible = VisibleMaps()
        to_masked_dense(self.backbone, self.visible)

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> list[torch.Tensor]:
        if visible is None or visible.dtype != torch.bool or visible.dim() != 4:
            raise ValueError("visible must be a bool [B, 1, h, w] mask (True = visible) at patch resolution")
        self.visible.set(visible.to(images.device))
        try:
            mask = self.visible.dense(images.shape[2], images.shape[3], images.dtype)
            return list(self.backbone(images * mask))
        finally:
            self.visible.set(None)
