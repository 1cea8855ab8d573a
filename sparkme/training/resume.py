"""Resuming: the checkpoint must come from the same model; say so in one line when it does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparkme.errors import UserError

__all__ = ["config_differences", "check_same_model", "load_model_state"]


def config_differences(saved: Any, current: Any, prefix: str) -> list[str]:
    """``key: saved -> current`` for every leaf that differs between two plain (nested) configs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current), key=str):
            out += config_differences(saved.get(key), current.get(key), f"{prefix}.{key}")
        return out
    return [] if saved == current else [f"{prefix}: {saved!r} -> {current!r}"]


def check_same_model(checkpoint: dict[str, Any], model_cfg: Any, path: Path) -> None:
    """Refuse a checkpoint whose model config differs from this run's, before touching any weights."""
    differences = config_differences(checkpoint.get("model_cfg"), model_cfg, "model")
    if differences:
        shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
        raise UserError(
            f"{path} was written by a different model ({shown}, checkpoint -> this run); resume with the same "
            "model settings, or start this configuration in another run dir (hydra.run.dir=...)"
        )


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict(state)`` with a one-line summary instead of pages of keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = [
            f"{len(names)} {kind} (e.g. {names[0]})"
            for kind, names in (("missing", missing), ("unexpected", unexpected), ("with other shapes", reshaped))
            if names
        ]
        raise UserError(
            f"{path} does not fit this model: weights {', '.join(parts)}; resume with the model settings it "
            "was written with (see its config), or start in another run dir (hydra.run.dir=...)"
        )
    model.load_state_dict(state)
