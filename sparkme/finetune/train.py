"""Full fine-tuning of a timm classifier: AdamW with layer-wise lr decay, warmup + cosine, optional mixup."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from timm.scheduler import CosineLRScheduler

__all__ = ["evaluate", "finetune"]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``dataset``."""
    model.eval()
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        correct += (model(images).argmax(1) == torch.as_tensor(labels)).sum().item()
        total += len(images)
    return 100 * correct / total


def _warmup_cosine(
    optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int
) -> CosineLRScheduler:
    """timm's per-step cosine schedule from ``lr``/1000 through a linear warmup down to ``lr``/1000."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer,
        t_initial=total_steps,
        warmup_t=min(warmup_steps, max(total_steps - 1, 0)),
        warmup_lr_init=lr * 1e-3,
        lr_min=lr * 1e-3,
        t_in_epochs=False,
    )


def finetune(
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    layer_decay: float | None,
    batch_size: int,
    mixup: bool,
    warmup_epochs: int,
    seed: int,
) -> dict[str, float]:
    """Train every parameter; ``layer_decay`` < 1 scales each layer's lr by decay^(depth from the top).

    Uses timm's optimizer factory (it groups parameters by depth for layer decay and skips
    weight decay on norms and biases) and timm's scheduler, which honours those per-group scales.
    ``mixup`` turns on timm's Mixup/CutMix with label smoothing 0.1.
    """
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, drop_last=mixup)
    if len(loader) == 0:
        raise ValueError(
            f"batch size {batch_size} is larger than the {len(train)} training images (mixup drops partial batches)"
        )
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
    scheduler = _warmup_cosine(optimizer, lr, epochs * len(loader), warmup_epochs * len(loader))
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes) if mixup else None
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss()
    step = 0
    loss_value = float("nan")
    for _ in range(epochs):
        model.train()
        for images, labels in loader:
            labels = torch.as_tensor(labels)
            if mixer is not None:
                images, labels = mixer(images, labels)
            loss = criterion(model(images), labels)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            loss_value = loss.item()
    return {"top1": evaluate(model, val, batch_size), "final_loss": loss_value}
