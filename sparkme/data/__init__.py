"""Pretraining data: the built-in demo images and volumes, image and volume folders, augmentation,
resumable order."""

from sparkme.data.demo import DemoDataset
from sparkme.data.folder import ImageFolderDataset
from sparkme.data.sampling import ResumableSampler, SeededTransformDataset
from sparkme.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, pretrain_transform
from sparkme.data.volume_demo import DemoVolumeDataset
from sparkme.data.volume_folder import VolumeFolderDataset, read_volume
from sparkme.data.volume_transforms import normalize_intensity, volume_eval_transform, volume_pretrain_transform

__all__ = [
    "DemoDataset",
    "ImageFolderDataset",
    "ResumableSampler",
    "SeededTransformDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "denormalize",
    "pretrain_transform",
    "DemoVolumeDataset",
    "VolumeFolderDataset",
    "read_volume",
    "normalize_intensity",
    "volume_pretrain_transform",
    "volume_eval_transform",
]
