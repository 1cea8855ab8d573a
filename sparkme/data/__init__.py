"""Pretraining data: the built-in demo images, any image folder, augmentation, resumable order."""

from sparkme.data.demo import DemoDataset
from sparkme.data.folder import ImageFolderDataset
from sparkme.data.sampling import ResumableSampler, SeededTransformDataset
from sparkme.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, pretrain_transform

__all__ = [
    "DemoDataset",
    "ImageFolderDataset",
    "ResumableSampler",
    "SeededTransformDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "denormalize",
    "pretrain_transform",
]
