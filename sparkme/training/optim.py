"""Optimizer setup: parameter groups without decay for biases, norms and mask embeddings; LAMB."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparkme.method.spark import split_weight_decay

__all__ = ["effective_lr", "param_groups", "build_optimizer", "apply_schedule"]


def effective_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the paper: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups split by the method's no-weight-decay rule (:func:`~sparkme.method.spark.split_weight_decay`);
    ``wd_scale`` tells :func:`apply_schedule` which one follows the weight-decay schedule."""
    decay, plain = split_weight_decay(model)
    return [{"params": decay, "wd_scale": 1.0}, {"params": plain, "wd_scale": 0.0}]


def build_optimizer(
    model: nn.Module, factory: Callable[..., torch.optim.Optimizer], lr: float
) -> torch.optim.Optimizer:
    """``factory(groups, lr=lr)``, e.g. a Hydra ``_partial_`` of ``timm.optim.Lamb``."""
    return factory(param_groups(model), lr=lr)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this step's lr on every group and weight decay on the decayed group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)
