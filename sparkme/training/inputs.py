"""What the trainer feeds the model: images or volumes, their side and their augmentation, checked
against the model before anything is built.

Image configs give ``data.image_size`` (RandomResizedCrop + flip, as the official SparK); volume
configs give ``data.volume_size`` (a random cube crop + axis flips). The model's rank
(``spatial_dims`` of its encoder: 2 for Conv2d CNNs, 3 for Conv3d ones) must match the data's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparkme.method.masking import check_mask_grid

__all__ = ["Inputs", "pretraining_inputs"]


@dataclass(frozen=True)
class Inputs:
    """The input side (pixels or voxels), its rank, and the per-sample pretraining augmentation."""

    size: int
    spatial_dims: int
    transform: Callable[[Any], Any]

    def describe(self, count: int) -> str:
        if self.spatial_dims == 3:
            return f"{count} volumes at {self.size}^3 voxels"
        return f"{count} images at {self.size}px"


def pretraining_inputs(data_cfg: Any, spatial_dims: int, patch_size: int, mask_ratio: float) -> Inputs:
    """The inputs a ``data`` config gives a model of rank ``spatial_dims``; a mismatch or a size the
    mask cannot tile is a clear ``ValueError`` in config terms."""
    volumes = data_cfg.get("volume_size") is not None  # volume configs name their cube side
    key = "volume_size" if volumes else "image_size"
    if volumes != (spatial_dims == 3):
        have, want = ("volumes", "images") if volumes else ("images", "volumes")
        advice = "data=demo or data=imagefolder" if volumes else "data=demo3d or data=volumefolder"
        raise ValueError(
            f"the data config gives {have} (data.{key}) but the model is a {spatial_dims}-d CNN that takes "
            f"{want}; use {advice}, or a model of the data's rank"
        )
    size = int(data_cfg[key])
    try:
        check_mask_grid((size,) * spatial_dims, patch_size, mask_ratio)
    except ValueError as error:
        raise ValueError(f"data.{key}={size}, spark.mask_ratio={mask_ratio}: {error}") from None
    if volumes:
        from sparkme.data.volume_transforms import volume_pretrain_transform

        return Inputs(size, 3, volume_pretrain_transform(size, float(data_cfg.get("flip", 0.5))))
    from sparkme.data.transforms import pretrain_transform

    return Inputs(size, 2, pretrain_transform(size, tuple(data_cfg.get("crop_scale", (0.67, 1.0)))))
