"""timm and safetensors exports: the dense trunk under timm's own keys, head left out.

Load with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH),
num_classes=K)``: timm drops the classifier when ``K`` differs from the model's default and
then loads non-strictly, so the missing head is freshly initialised.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Export, timm_trunk_state_dict

__all__ = ["to_safetensors", "to_timm"]


def _notes(model_name: str, suffix: str) -> list[str]:
    return [
        f"timm.create_model({model_name!r}, pretrained=True, pretrained_cfg_overlay=dict(file='PATH{suffix}'), "
        "num_classes=K)",
        "K must differ from the architecture's default (1000) or be 0 (no head): timm then skips the absent "
        "classifier; with K == 1000 it loads strictly and fails on the missing head",
    ]


def to_timm(state_dict: Mapping[str, Any], model_name: str) -> Export:
    """Flat timm state dict saved with ``torch.save`` (``.pth``)."""
    trunk, dropped, unmapped = timm_trunk_state_dict(state_dict, model_name)
    return Export("timm", model_name, trunk, trunk, ".pth", dropped, unmapped, _notes(model_name, ".pth"))


def to_safetensors(state_dict: Mapping[str, Any], model_name: str) -> Export:
    """The same flat timm state dict as a ``.safetensors`` file (metadata names the model)."""
    trunk, dropped, unmapped = timm_trunk_state_dict(state_dict, model_name)
    notes = _notes(model_name, ".safetensors")
    return Export("safetensors", model_name, trunk, trunk, ".safetensors", dropped, unmapped, notes)
