"""SparK's pretraining augmentation: random resized crop + horizontal flip, nothing else."""

from __future__ import annotations

from torchvision import transforms as T

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "pretrain_transform", "eval_transform", "denormalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(image_size: int, scale: tuple[float, float] = (0.67, 1.0), hflip: float = 0.5) -> T.Compose:
    """RandomResizedCrop(scale 0.67-1, bicubic) + flip + ImageNet normalisation (the paper's recipe)."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(hflip),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(image_size: int) -> T.Compose:
    """Deterministic resize + centre crop, for reconstruction pictures."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def denormalize(images):  # noqa: ANN001, ANN201 - torch tensors in, torch tensors out
    """Undo ImageNet normalisation: ``[B,3,H,W]`` normalised -> ``[0, 1]``."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)
