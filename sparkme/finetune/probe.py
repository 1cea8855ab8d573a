"""Linear probe: frozen trunk in eval mode (BatchNorm uses its running statistics, re-estimated
on the probe's training images first by default: see ``batchnorm.py``), features computed once,
then a linear classifier trained on the standardised features.

Standardising with the train split's mean/std plays the role of MAE's affine-free BatchNorm
before the probe head: it makes one learning rate fit any trunk's feature scale, which keeps
the comparison between pretrained and random weights about the features, not their scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .model import pooled_features

__all__ = ["extract_features", "train_linear_probe"]


@torch.no_grad()
def extract_features(
    model: nn.Module, dataset: Dataset, batch_size: int, features: str = "last"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled trunk features (see ``pooled_features``) and labels of every image (model in eval mode)."""
    model.eval()
    pooled, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        pooled.append(pooled_features(model, images, features))
        labels.append(torch.as_tensor(targets))
    return torch.cat(pooled), torch.cat(labels)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def train_linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """Train ``nn.Linear`` (AdamW, cosine lr) on frozen features; top-1 on both splits, in percent."""
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = train
    val_x, val_y = val
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    head = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        bound = 1 / math.sqrt(train_x.shape[1])
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(head(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return {"train_top1": 100 * _accuracy(head(train_x), train_y), "top1": 100 * _accuracy(head(val_x), val_y)}
