"""Volume intensity normalisation and the 3D pretraining augmentation (random crop + flips).

Volumes are tensors ``[C, D, H, W]``. Normalisation is per volume and per channel (the
statistics of a crop would change from crop to crop); cropping draws from torch's global
RNG, so :class:`~sparkme.data.sampling.SeededTransformDataset` makes every crop resumable.
A volume smaller than the crop along an axis is padded with that channel's minimum (the
background of a normalised scan), centred, before cropping.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CLIP_PERCENTILES",
    "normalize_intensity",
    "VolumeCrop",
    "volume_pretrain_transform",
    "volume_eval_transform",
]

CLIP_PERCENTILES = (0.5, 99.5)


def normalize_intensity(volume: np.ndarray, clip_percentiles: Sequence[float] | None = CLIP_PERCENTILES) -> np.ndarray:
    """Per channel: clip to the given percentiles (None: no clip), then z-score; float32 ``[C, D, H, W]``.

    A constant channel has no scale to divide by: it becomes all zeros.
    """
    out = np.empty(volume.shape, np.float32)
    for channel, values in enumerate(volume):
        values = values.astype(np.float32, copy=False)
        if clip_percentiles is not None:
            low, high = np.percentile(values, [float(clip_percentiles[0]), float(clip_percentiles[1])])
            values = np.clip(values, low, high)
        mean = values.mean(dtype=np.float64)
        std = values.std(dtype=np.float64)
        scale = 1.0 / std if std > 1e-8 * max(1.0, abs(mean)) else 0.0
        out[channel] = (values - np.float32(mean)) * np.float32(scale)
    return out


def _pad_to(volume: torch.Tensor, size: int) -> torch.Tensor:
    """Pad each spatial axis shorter than ``size`` to ``size`` (centred) with each channel's minimum."""
    short = [max(0, size - side) for side in volume.shape[1:]]
    if not any(short):
        return volume
    pads: list[int] = []
    for missing in reversed(short):  # F.pad lists the last axis first
        pads += [missing // 2, missing - missing // 2]
    floor = volume.flatten(1).amin(dim=1)
    return torch.stack([F.pad(channel, pads, value=float(low)) for channel, low in zip(volume, floor)])


class VolumeCrop:
    """Crop a ``size``-cube from ``[C, D, H, W]`` (random or centred), then flip each axis with ``flip``."""

    def __init__(self, size: int, random: bool = True, flip: float = 0.5) -> None:
        if size < 1:
            raise ValueError(f"volume crop size must be >= 1, got {size}")
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {flip}")
        self.size, self.random, self.flip = int(size), bool(random), float(flip)

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.dim() != 4:
            raise ValueError(f"a volume is [C, D, H, W]; got shape {tuple(volume.shape)}")
        volume = _pad_to(volume, self.size)
        starts = []
        for side in volume.shape[1:]:
            room = side - self.size
            starts.append(int(torch.randint(room + 1, ())) if self.random else room // 2)
        d, h, w = starts
        crop = volume[:, d : d + self.size, h : h + self.size, w : w + self.size]
        if self.flip > 0:
            axes = [axis + 1 for axis in range(3) if float(torch.rand(())) < self.flip]
            if axes:
                crop = crop.flip(axes)
        return crop.contiguous()

    def __repr__(self) -> str:
        return f"VolumeCrop(size={self.size}, random={self.random}, flip={self.flip})"


def volume_pretrain_transform(volume_size: int, flip: float = 0.5) -> VolumeCrop:
    """Random ``volume_size``-cube crop + a flip of each axis with probability ``flip``."""
    return VolumeCrop(volume_size, random=True, flip=flip)


def volume_eval_transform(volume_size: int) -> VolumeCrop:
    """Deterministic centre crop (padding small volumes), for reconstruction pictures."""
    return VolumeCrop(volume_size, random=False, flip=0.0)
