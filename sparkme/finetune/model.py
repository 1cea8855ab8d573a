"""A timm classifier initialised from SparK weights (exported file or checkpoint) or at random."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["build_classifier", "pooled_features", "resolve_model_name"]


def resolve_model_name(weights: str | Path | None, model_name: str | None) -> str:
    """The timm architecture: ``model_name`` if given, else the one recorded in ``weights``."""
    recorded = None
    if weights is not None:
        from sparkme.converters import read_encoder

        _, recorded = read_encoder(weights)
    if model_name and recorded and model_name.split(".")[0] != recorded.split(".")[0]:
        raise ValueError(f"--model {model_name} contradicts the weights, which were trained as {recorded}")
    name = model_name or recorded
    if not name:
        raise ValueError("cannot tell the architecture: pass --model (e.g. resnet18)")
    return name


def build_classifier(model_name: str, num_classes: int, weights: str | Path | None = None) -> nn.Module:
    """``timm.create_model(model_name, num_classes=num_classes)`` with the trunk from ``weights``.

    ``weights`` may be a sparkme checkpoint, its ``*.encoder.safetensors``, or a file written by
    ``sparkme-export --format timm|safetensors``; ``None`` keeps timm's random init (the
    baseline). Only the classifier head may be absent from the weights; anything else is an error.
    """
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    if weights is None:
        return model
    from sparkme.converters import convert, read_encoder
    from sparkme.converters.base import timm_reference

    state_dict, _ = read_encoder(weights)
    trunk = convert(state_dict, model_name, "timm").state_dict
    result = model.load_state_dict(trunk, strict=False)
    _, heads = timm_reference(model_name)
    not_head = sorted(key for key in result.missing_keys if key.split(".", 1)[0] not in heads)
    if not_head or result.unexpected_keys:
        raise ValueError(
            f"weights {weights} do not fit {model_name}: "
            f"missing {not_head[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, features: str = "last") -> torch.Tensor:
    """Globally pooled trunk features.

    ``"last"``: the classifier's own input. ``"stages"``: the average-pooled outputs of every
    timm ``feature_info`` stage with stride >= 4 (the maps SparK's encoder feeds its decoder),
    concatenated: a multi-scale probe.
    """
    if features == "last":
        return model.forward_head(model.forward_features(images), pre_logits=True)
    if features != "stages":
        raise ValueError(f"features must be 'last' or 'stages', got {features!r}")
    names = [info["module"] for info in model.feature_info if info["reduction"] >= 4]
    outputs: list[torch.Tensor] = []
    handles = [
        model.get_submodule(name).register_forward_hook(lambda module, args, output: outputs.append(output))
        for name in names
    ]
    try:
        model.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([output.mean(dim=(2, 3)) for output in outputs], dim=1)
