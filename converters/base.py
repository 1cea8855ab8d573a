"""What every weight export returns, and the timm reference every converter starts from.

A converter is a pure function ``(state_dict, model_name) -> Export``: it never touches the
disk (``converters.io`` writes), so it can be tested on a real model's state dict. Each
export lists what it left out and why, so a user can tell a dropped classifier from a
silently lost layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Export", "UnsupportedArchitectureError", "base_model_name", "timm_reference", "timm_trunk_state_dict"]


class UnsupportedArchitectureError(ValueError):
    """The requested format has no mapping for this architecture."""


@dataclass
class Export:
    """Weights converted for one consumer, plus the report of what changed.

    ``state_dict`` holds the weights under the consumer's names; ``payload`` is the object
    written to disk (the state dict itself, or the consumer's wrapper around it).
    """

    format: str
    model_name: str
    state_dict: dict[str, Any]
    payload: Any
    suffix: str
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why it was left out
    unmapped: list[str] = field(default_factory=list)  # source keys with no place in the target
    notes: list[str] = field(default_factory=list)  # settings the consumer needs

    def report(self) -> str:
        """Human-readable summary: counts, every dropped/unmapped key, then the notes."""
        lines = [f"{self.format}: {len(self.state_dict)} tensors for {self.model_name}"]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} keys:")
            lines += [f"  {key}  ({why})" for key, why in sorted(self.dropped.items())]
        if self.unmapped:
            lines.append(f"could not map {len(self.unmapped)} keys (left out):")
            lines += [f"  {key}" for key in sorted(self.unmapped)]
        if not self.dropped and not self.unmapped:
            lines.append("no keys dropped or unmapped")
        if self.notes:
            lines.append("notes:")
            lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def base_model_name(model_name: str) -> str:
    """Architecture part of a timm name: ``resnet50.a1_in1k`` -> ``resnet50``."""
    return model_name.split(".", 1)[0]


def timm_reference(model_name: str) -> tuple[dict[str, torch.Size], list[str]]:
    """Shapes of the timm model's state dict and its head prefixes, built on the meta device.

    The head is the top-level module holding the classifier named in ``pretrained_cfg``
    (``fc`` for ResNet, ``head`` for ConvNeXt): SparK never trains it, so exports leave it out
    and the consumer initialises a fresh one for its own classes.
    """
    import timm

    if not timm.is_model(base_model_name(model_name)):
        raise UnsupportedArchitectureError(
            f"{model_name!r} is not a timm model name; pass the timm architecture the encoder was built from "
            "(e.g. resnet50, convnext_tiny)"
        )
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    heads = sorted({name.split(".", 1)[0] for name in classifiers})
    return shapes, heads


def timm_trunk_state_dict(
    state_dict: Mapping[str, Any], model_name: str
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Clean a dense encoder state dict into the timm model's trunk keys.

    Accepts the plain model's keys or those of a timm ``features_only`` wrapper, whose
    flattened top-level sequentials read ``stages_0.`` for ``stages.0.``. Returns the trunk
    (head removed), the dropped keys with reasons, and the keys matching nothing.
    Raises ``ValueError`` when a trunk tensor is missing or has the wrong shape: such weights
    would not load into ``model_name``.
    """
    shapes, heads = timm_reference(model_name)
    flattened = {key.replace(".", "_", 1): key for key in shapes}
    trunk: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    unmapped: list[str] = []
    for source_key, value in state_dict.items():
        key = source_key if source_key in shapes else flattened.get(source_key, source_key)
        if key.split(".", 1)[0] in heads:
            dropped[source_key] = "classifier head: not trained by SparK, the consumer initialises it"
        elif key not in shapes:
            unmapped.append(source_key)
        elif not isinstance(value, torch.Tensor):
            raise ValueError(f"{source_key!r} is a {type(value).__name__}, expected a tensor")
        elif value.shape != shapes[key]:
            raise ValueError(
                f"{source_key!r} has shape {tuple(value.shape)} but {model_name} expects {tuple(shapes[key])}: "
                "the weights come from a different architecture than --model-name says"
            )
        else:
            trunk[key] = value.detach().cpu().contiguous()
    missing = [key for key in shapes if key.split(".", 1)[0] not in heads and key not in trunk]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(
            f"the encoder weights lack {len(missing)} tensors of {model_name} ({shown}); "
            "is the model name right and is this a full encoder state dict?"
        )
    return trunk, dropped, unmapped
