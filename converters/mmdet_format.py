"""mmdetection export: ``{"state_dict": {"backbone." + key: tensor}}`` for a ``Pretrained`` init.

ResNet family: mmdet's ``ResNet``/``ResNeXt`` backbones use torchvision's names (``conv1``,
``bn1``, ``layerN.B.convK``, ``bnK``, ``downsample.0/1``), so keys only gain the prefix.
ConvNeXt (v1 and v2): renamed to mmpretrain's ``ConvNeXt`` (``downsample_layers``,
``depthwise_conv``, ``pointwise_conv1/2``, ``grn.gamma/beta``), which mmdet configs use as
``type="mmpretrain.ConvNeXt"``. Use in a config as
``init_cfg=dict(type="Pretrained", checkpoint=PATH, prefix="backbone.")``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sparkme.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .base import Export, UnsupportedArchitectureError, base_model_name, timm_trunk_state_dict
from .torchvision_format import TORCHVISION_RESNETS, torchvision_resnet_state_dict

__all__ = ["mmpretrain_convnext_key", "to_mmdet"]

PREFIX = "backbone."

# torchvision arch -> mmdet backbone config (wide ResNets have no mmdet counterpart)
_MMDET_RESNETS: dict[str, str] = {
    "resnet18": "type='ResNet', depth=18",
    "resnet34": "type='ResNet', depth=34",
    "resnet50": "type='ResNet', depth=50",
    "resnet101": "type='ResNet', depth=101",
    "resnet152": "type='ResNet', depth=152",
    "resnext50_32x4d": "type='ResNeXt', depth=50, groups=32, base_width=4",
    "resnext101_32x8d": "type='ResNeXt', depth=101, groups=32, base_width=8",
    "resnext101_64x4d": "type='ResNeXt', depth=101, groups=64, base_width=4",
}

_CONVNEXT_RULES = (
    (r"^stem\.(\d)\.", r"downsample_layers.0.\1."),
    (r"^stages\.(\d+)\.downsample\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"\.conv_dw\.", ".depthwise_conv."),
    (r"\.mlp\.fc1\.", ".pointwise_conv1."),
    (r"\.mlp\.fc2\.", ".pointwise_conv2."),
    (r"\.mlp\.grn\.weight$", ".grn.gamma"),
    (r"\.mlp\.grn\.bias$", ".grn.beta"),
)


def mmpretrain_convnext_key(key: str) -> str:
    """timm ConvNeXt key -> mmpretrain ConvNeXt key.

    ``stages.1.blocks.0.mlp.fc1.weight`` -> ``stages.1.0.pointwise_conv1.weight``.
    """
    for pattern, replacement in _CONVNEXT_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def _mmdet_notes(backbone: str, mean: Sequence[float], std: Sequence[float], extra: str = "") -> list[str]:
    return [
        f"backbone=dict({backbone}, {extra}"
        "init_cfg=dict(type='Pretrained', checkpoint='PATH.pth', prefix='backbone.'))",
        f"data_preprocessor: mean={[round(255 * value, 3) for value in mean]}, "
        f"std={[round(255 * value, 3) for value in std]}, bgr_to_rgb=True",
    ]


def _resnet(state_dict: Mapping[str, Any], model_name: str, mean: Sequence[float], std: Sequence[float]) -> Export:
    arch, weights, dropped, unmapped = torchvision_resnet_state_dict(state_dict, model_name)
    backbone = {PREFIX + key: value for key, value in weights.items()}
    notes = _mmdet_notes(_MMDET_RESNETS[arch], mean, std, "style='pytorch', ")
    payload = {"state_dict": backbone, "meta": {"source": "sparkme", "model_name": model_name}}
    return Export("mmdet", model_name, backbone, payload, ".pth", dropped, unmapped, notes)


def _convnext(state_dict: Mapping[str, Any], model_name: str, mean: Sequence[float], std: Sequence[float]) -> Export:
    trunk, dropped, unmapped = timm_trunk_state_dict(state_dict, model_name)
    backbone: dict[str, torch.Tensor] = {}
    for key, value in trunk.items():
        if re.search(r"\.mlp\.fc[12]\.weight$", key) and value.ndim == 4:
            value = value.flatten(1)  # timm's conv-MLP variants: 1x1 conv == mmpretrain's default Linear
        backbone[PREFIX + mmpretrain_convnext_key(key)] = value
    size = base_model_name(model_name).split("_", 1)[1]
    version2 = base_model_name(model_name).startswith("convnextv2")
    extra = "use_grn=True, layer_scale_init_value=0.0, " if version2 else ""
    notes = _mmdet_notes(
        f"type='mmpretrain.ConvNeXt', arch='{size}'",
        mean,
        std,
        extra + "out_indices=[0, 1, 2, 3], gap_before_final_norm=False, ",
    )
    notes.append("needs custom_imports=dict(imports=['mmpretrain.models']); its norm0..norm3 start fresh")
    payload = {"state_dict": backbone, "meta": {"source": "sparkme", "model_name": model_name}}
    return Export("mmdet", model_name, backbone, payload, ".pth", dropped, unmapped, notes)


_CONVNEXT_SIZES = ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "xlarge", "huge")


def to_mmdet(
    state_dict: Mapping[str, Any],
    model_name: str,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Export:
    """mmdet checkpoint (``.pth``) for the ResNet family or ConvNeXt v1/v2."""
    name = base_model_name(model_name)
    if name in _MMDET_RESNETS:
        return _resnet(state_dict, model_name, mean, std)
    family, _, size = name.partition("_")
    if family in ("convnext", "convnextv2") and size in _CONVNEXT_SIZES:
        return _convnext(state_dict, model_name, mean, std)
    reason = " (mmdet's ResNet has no wide-bottleneck option)" if name in TORCHVISION_RESNETS else ""
    raise UnsupportedArchitectureError(
        f"no mmdet mapping for {model_name!r}{reason}; supported: {', '.join(_MMDET_RESNETS)}, "
        f"convnext_<size> and convnextv2_<size> with size in {', '.join(_CONVNEXT_SIZES)}"
    )
