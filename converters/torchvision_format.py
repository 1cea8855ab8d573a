"""torchvision export for the ResNet family: ``torchvision.models.<arch>`` keys, ``fc`` left out.

timm's ResNet, ResNeXt and Wide ResNet keep torchvision's module names (``conv1``, ``bn1``,
``layerN.B.convK``, ``downsample.0/1``), so the export is a checked identity map: every key
and shape is compared with a torchvision model built on the meta device. Load with
``model.load_state_dict(sd, strict=False)``; only ``fc.weight`` and ``fc.bias`` are missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import Export, UnsupportedArchitectureError, base_model_name, timm_trunk_state_dict

__all__ = ["TORCHVISION_RESNETS", "torchvision_resnet_state_dict", "to_torchvision"]

# timm architecture name -> torchvision builder name (identical for this family)
TORCHVISION_RESNETS = {
    name: name
    for name in (
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext50_32x4d",
        "resnext101_32x8d",
        "resnext101_64x4d",
        "wide_resnet50_2",
        "wide_resnet101_2",
    )
}


def _torchvision_shapes(arch: str) -> dict[str, torch.Size]:
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.get_model(arch, weights=None)
    return {key: value.shape for key, value in model.state_dict().items()}


def torchvision_resnet_state_dict(
    state_dict: Mapping[str, Any], model_name: str
) -> tuple[str, dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The trunk under torchvision keys, checked against the torchvision model.

    Returns ``(torchvision_arch, weights, dropped, unmapped)``; shared by the torchvision,
    detectron2 and mmdet exports, which all start from torchvision's ResNet naming.
    """
    arch = TORCHVISION_RESNETS.get(base_model_name(model_name))
    if arch is None:
        raise UnsupportedArchitectureError(
            f"{model_name!r} has no torchvision/detectron2/mmdet ResNet counterpart; supported: "
            f"{', '.join(TORCHVISION_RESNETS)} (use --format timm or safetensors for any timm model)"
        )
    trunk, dropped, unmapped = timm_trunk_state_dict(state_dict, model_name)
    expected = _torchvision_shapes(arch)
    weights: dict[str, torch.Tensor] = {}
    for key, value in trunk.items():
        if key in expected and expected[key] == value.shape:
            weights[key] = value
        else:
            unmapped.append(key)
    missing = sorted(set(expected) - set(weights) - {"fc.weight", "fc.bias"})
    if missing:
        raise ValueError(f"{model_name} weights do not cover torchvision {arch}: missing {', '.join(missing[:8])}")
    return arch, weights, dropped, unmapped


def to_torchvision(state_dict: Mapping[str, Any], model_name: str) -> Export:
    """State dict for ``torchvision.models.<arch>`` saved with ``torch.save`` (``.pth``)."""
    arch, weights, dropped, unmapped = torchvision_resnet_state_dict(state_dict, model_name)
    notes = [
        f"model = torchvision.models.{arch}(num_classes=K); "
        "model.load_state_dict(torch.load('PATH.pth'), strict=False)  # missing: fc.weight, fc.bias",
    ]
    return Export("torchvision", model_name, weights, weights, ".pth", dropped, unmapped, notes)
