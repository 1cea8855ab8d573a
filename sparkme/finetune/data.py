"""Labelled train / held-out splits for fine-tuning and probing: the demo set or an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from sparkme.errors import UserError

__all__ = ["LabelledSplits", "demo_splits", "folder_splits"]


class LabelledSplits:
    """A train split, a held-out split and the class names."""

    def __init__(self, train: Dataset, val: Dataset, classes: list[str]) -> None:
        if len(classes) < 2:
            raise UserError(
                f"classification needs at least two classes, found {len(classes)} ({', '.join(classes)}); "
                "give --data a folder with one subfolder of images per class"
            )
        if len(train) == 0 or len(val) == 0:
            raise UserError(f"both splits need images: train has {len(train)}, held-out has {len(val)}")
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


def _image_folder(root: Path, transform: Any) -> Dataset:
    """torchvision's ``ImageFolder`` reading through the project's one image loader."""
    from torchvision.datasets import ImageFolder

    from sparkme.data.folder import read_image

    return ImageFolder(root, transform=transform, loader=read_image)


def folder_splits(
    root: str | Path, val_fraction: float, split_seed: int, train_transform: Any, val_transform: Any
) -> LabelledSplits:
    """Class-subfolder images (torchvision ``ImageFolder`` layout), read with the pretraining loader.

    ``root/train`` and ``root/val`` are used as given when both exist; otherwise a fixed random
    ``val_fraction`` of ``root`` (seeded by ``split_seed``, the same for every run) is held out.
    Images go through :func:`sparkme.data.folder.read_image` (EXIF orientation, 16-bit and alpha
    handled as in pretraining).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = _image_folder(root / "train", train_transform)
        val = _image_folder(root / "val", val_transform)
        if train.classes != val.classes:
            raise ValueError(f"{root}/train and {root}/val have different class folders")
        return LabelledSplits(train, val, train.classes)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_view = _image_folder(root, train_transform)
    val_view = _image_folder(root, val_transform)
    order = torch.randperm(len(train_view), generator=torch.Generator().manual_seed(split_seed)).tolist()
    held_out = max(1, round(val_fraction * len(order)))
    return LabelledSplits(Subset(train_view, order[held_out:]), Subset(val_view, order[:held_out]), train_view.classes)
