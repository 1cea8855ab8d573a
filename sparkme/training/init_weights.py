"""``init_from``: start pretraining from released weights (official SparK or sparkme), weights only.

Accepted files: an official SparK "with decoder" checkpoint (``{"module": ...}`` with
``sparse_encoder.sp_cnn.*``, ``dense_decoder.*``, ``densify_*``, ``mask_tokens.*``), an official
encoder-only "timm style" / "official style" file (timm ResNet keys, official ConvNeXt keys),
any dense timm state dict (``.pth`` or ``.safetensors``), or a sparkme checkpoint (its whole
``model``). Unlike ``resume``, the optimizer, step and RNG start fresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparkme.converters.io import read_encoder
from sparkme.converters.spark_format import encoder_from_official, from_spark, is_official_spark

__all__ = ["InitReport", "init_from", "read_initial_state"]

log = logging.getLogger(__name__)

_HEADS = ("fc.", "head.", "classifier.", "norm.")  # classifier parts SparK never trains


@dataclass
class InitReport:
    """What ``init_from`` loaded: tensor count, what it left at init, what it skipped and why."""

    source: str
    loaded: int
    left_at_init: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"init_from {self.source}: loaded {self.loaded} tensors"]
        if self.left_at_init:
            parts.append(f"{len(self.left_at_init)} kept their fresh init ({_shown(self.left_at_init)})")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} ({_shown(sorted(self.skipped))})")
        return "; ".join(parts)


def _shown(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "")


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise ValueError(
            f"init_from={path} is not a readable torch checkpoint ({type(error).__name__}: {error})"
        ) from error


def read_initial_state(path: str | Path, levels: list[int] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors under sparkme SparK keys (``encoder.model.<timm key>``, ``decoder.*``, ``densify.*``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_from={path}: no such file")
    if path.suffix == ".safetensors":
        encoder, _ = read_encoder(path)
        return {"encoder.model." + key: value for key, value in encoder.items()}, {}
    obj = _load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"init_from={path} holds a {type(obj).__name__}, expected a checkpoint dict")
    if isinstance(obj.get("model"), dict) and "encoder" in obj:  # a sparkme checkpoint
        return dict(obj["model"]), {}
    state = obj.get("module", obj)
    if isinstance(state, dict) and is_official_spark(state):
        return from_spark(state, levels)
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"init_from={path} holds no tensors (keys: {_shown(sorted(map(str, state)))})")
    return {"encoder.model." + key: value for key, value in encoder_from_official(tensors).items()}, {}


def _model_key(key: str, targets: dict[str, torch.Tensor]) -> str | None:
    """The model's name for ``key``: itself, or its timm ``features_only`` flattening (``stages_0.``)."""
    if key in targets:
        return key
    prefix = "encoder.model."
    if key.startswith(prefix):
        flattened = prefix + key[len(prefix) :].replace(".", "_", 1)
        if flattened in targets:
            return flattened
    return None


def init_from(model: nn.Module, path: str | Path) -> InitReport:
    """Copy the weights of ``path`` into a sparkme ``SparK`` in place; refuse anything that does not fit.

    Every encoder tensor of the model except a classifier head must be in the file (a wrong
    architecture fails here, not after a silent partial load); decoder, densify and mask tokens
    are taken when the file has them and keep their fresh init otherwise.
    """
    targets = model.state_dict()
    source, skipped = read_initial_state(path, getattr(model, "levels", None))
    matched: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in source.items():
        name = _model_key(key, targets)
        if name is None:
            inner = key.removeprefix("encoder.model.")
            if key.startswith("encoder.model.") and inner.startswith(_HEADS):
                skipped[key] = "classifier head: not part of the SparK encoder"
            else:
                unmatched.append(key)
        elif targets[name].shape != value.shape:
            raise ValueError(
                f"init_from={path}: {key} has shape {tuple(value.shape)} but the model's {name} is "
                f"{tuple(targets[name].shape)}; the file comes from another architecture or decoder width"
            )
        else:
            matched[name] = value
    if unmatched:
        raise ValueError(f"init_from={path}: {len(unmatched)} tensors match nothing in the model ({_shown(unmatched)})")
    missing = [k for k in targets if k.startswith("encoder.") and k not in matched and not _is_head(k)]
    if missing:
        raise ValueError(f"init_from={path} lacks {len(missing)} encoder tensors of this model ({_shown(missing)})")
    with torch.no_grad():
        for name, value in matched.items():
            targets[name].copy_(value)
    report = InitReport(str(path), len(matched), [k for k in targets if k not in matched], skipped)
    log.info(report.summary())
    return report


def _is_head(key: str) -> bool:
    return key.removeprefix("encoder.model.").startswith(_HEADS)
