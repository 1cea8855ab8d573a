"""Labelled train / held-out splits for fine-tuning and probing: the demo set or an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

__all__ = ["LabelledSplits", "demo_splits", "folder_splits"]


class LabelledSplits:
    """A train split, a held-out split and the class names."""

    def __init__(self, train: Dataset, val: Dataset, classes: list[str]) -> None:
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"both splits need images: train has {len(train)}, held-out has {len(val)}")
        self.train, self.val, self.classes = train, val, classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def demo_splits(
    train_size: int, val_size: int, image_size: int, seed: int, train_transform: Any, val_transform: Any
) -> LabelledSplits:
    """Demo images with their pattern labels; the held-out split is drawn from seed ``seed + 1``.

    Demo image ``i`` is a pure function of ``(seed, i)``, so the two splits share no image; pick
    a ``seed`` different from the pretraining run's to keep both splits unseen in pretraining.
    """
    from sparkme.data.demo import DemoDataset

    train = DemoDataset(length=train_size, image_size=image_size, seed=seed, transform=train_transform)
    val = DemoDataset(length=val_size, image_size=image_size, seed=seed + 1, transform=val_transform)
    return LabelledSplits(train, val, list(DemoDataset.classes))


def folder_splits(
    root: str | Path, val_fraction: float, split_seed: int, train_transform: Any, val_transform: Any
) -> LabelledSplits:
    """Class-subfolder images (torchvision ``ImageFolder`` layout).

    ``root/train`` and ``root/val`` are used as given when both exist; otherwise a fixed random
    ``val_fraction`` of ``root`` (seeded by ``split_seed``, the same for every run) is held out.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = ImageFolder(root / "train", transform=train_transform)
        val = ImageFolder(root / "val", transform=val_transform)
        if train.classes != val.classes:
            raise ValueError(f"{root}/train and {root}/val have different class folders")
        return LabelledSplits(train, val, train.classes)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_view = ImageFolder(root, transform=train_transform)
    val_view = ImageFolder(root, transform=val_transform)
    order = torch.randperm(len(train_view), generator=torch.Generator().manual_seed(split_seed)).tolist()
    held_out = max(1, round(val_fraction * len(order)))
    return LabelledSplits(Subset(train_view, order[held_out:]), Subset(val_view, order[:held_out]), train_view.classes)
