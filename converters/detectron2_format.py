"""detectron2 export for the ResNet family: its own pickle format, keys renamed to d2's ResNet.

Renaming follows detectron2's torchvision-to-d2 rules: stem tensors gain ``stem.``
(``conv1`` -> ``stem.conv1``, ``bn1`` -> ``stem.conv1.norm``), ``layerN`` becomes ``res{N+1}``,
``bnK`` becomes ``convK.norm``, ``downsample.0/1`` become ``shortcut`` / ``shortcut.norm``.
detectron2 loads ``{"model": {name: ndarray}, "__author__": ..., "matching_heuristics": True}``
pickles itself (``DetectionCheckpointer``); its frozen BatchNorm has no
``num_batches_tracked``, so those counters are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from sparkme.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .base import Export
from .torchvision_format import torchvision_resnet_state_dict

__all__ = ["d2_resnet_key", "to_detectron2"]

# torchvision arch -> detectron2 MODEL.RESNETS settings besides STRIDE_IN_1X1
_D2_RESNETS: dict[str, dict[str, int]] = {
    "resnet18": {"DEPTH": 18, "RES2_OUT_CHANNELS": 64},
    "resnet34": {"DEPTH": 34, "RES2_OUT_CHANNELS": 64},
    "resnet50": {"DEPTH": 50},
    "resnet101": {"DEPTH": 101},
    "resnet152": {"DEPTH": 152},
    "resnext50_32x4d": {"DEPTH": 50, "NUM_GROUPS": 32, "WIDTH_PER_GROUP": 4},
    "resnext101_32x8d": {"DEPTH": 101, "NUM_GROUPS": 32, "WIDTH_PER_GROUP": 8},
    "resnext101_64x4d": {"DEPTH": 101, "NUM_GROUPS": 64, "WIDTH_PER_GROUP": 4},
    "wide_resnet50_2": {"DEPTH": 50, "WIDTH_PER_GROUP": 128},
    "wide_resnet101_2": {"DEPTH": 101, "WIDTH_PER_GROUP": 128},
}


def d2_resnet_key(key: str) -> str:
    """torchvision ResNet key -> detectron2 ResNet key (``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight``)."""
    if not key.startswith("layer"):
        key = "stem." + key
    key = re.sub(r"^layer(\d)\.", lambda match: f"res{int(match.group(1)) + 1}.", key)
    key = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", key)
    key = key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return key


def to_detectron2(
    state_dict: Mapping[str, Any],
    model_name: str,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Export:
    """detectron2 pickle (``.pkl``); ``mean``/``std`` are the 0-1 RGB normalisation used in pretraining."""
    arch, weights, dropped, unmapped = torchvision_resnet_state_dict(state_dict, model_name)
    model: dict[str, Any] = {}
    for key, value in weights.items():
        if key.endswith("num_batches_tracked"):
            dropped[key] = "BatchNorm step counter: detectron2's FrozenBatchNorm2d has none"
        else:
            model[d2_resnet_key(key)] = value.float().numpy()
    payload = {"model": model, "__author__": "sparkme", "matching_heuristics": True}
    resnets = {**_D2_RESNETS[arch], "STRIDE_IN_1X1": False}
    notes = [
        f'MODEL.WEIGHTS: "PATH.pkl"   (backbone {arch})',
        f"MODEL.PIXEL_MEAN: {[round(255 * value, 3) for value in mean]}",
        f"MODEL.PIXEL_STD: {[round(255 * value, 3) for value in std]}",
        'INPUT.FORMAT: "RGB"   (the weights expect RGB, detectron2 defaults to BGR)',
        *(f"MODEL.RESNETS.{name}: {value}" for name, value in resnets.items()),
    ]
    return Export("detectron2", model_name, model, payload, ".pkl", dropped, unmapped, notes)
