"""Random patch masks: which patches of each image (or volume) the encoder may not see.

A patch is a square (2D) or a cube (3D) whose side is the encoder's downsample ratio. The N-d
functions take the spatial sides as a sequence (``(H, W)`` or ``(D, H, W)``); the 2D names with
separate sides (:func:`patch_grid`, :func:`check_mask_geometry`, :func:`random_patch_mask`) call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "check_mask_geometry",
    "check_mask_grid",
    "check_mask_ratio",
    "hidden_patch_count",
    "patch_grid",
    "patch_grid_of",
    "random_grid_mask",
    "random_patch_mask",
    "upsample_mask",
    "visible_patch_count",
]


def check_mask_ratio(mask_ratio: float) -> float:
    """Return ``mask_ratio`` as a float, refusing values outside the open interval (0, 1)."""
    ratio = float(mask_ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1 (got {mask_ratio}); SparK uses 0.6 by default")
    return ratio


def visible_patch_count(num_patches: int, mask_ratio: float) -> int:
    """Number of patches kept visible per sample: ``round(num_patches * (1 - mask_ratio))`` (as official SparK)."""
    return int(round(num_patches * (1.0 - check_mask_ratio(mask_ratio))))


def hidden_patch_count(num_patches: int, mask_ratio: float) -> int:
    """Number of patches hidden per sample: ``num_patches - visible_patch_count(...)`` (29 of 49 at 0.6)."""
    return num_patches - visible_patch_count(num_patches, mask_ratio)


def _what(sides: Sequence[int]) -> str:
    return "image" if len(sides) == 2 else "volume"


def patch_grid_of(sides: Sequence[int], patch_size: int) -> tuple[int, ...]:
    """Patch grid of an image ``(H, W)`` or a volume ``(D, H, W)``, refusing sides that are not
    multiples of ``patch_size``."""
    sides = tuple(int(side) for side in sides)
    if any(side % patch_size or side <= 0 for side in sides):
        near = "x".join(str(max(1, round(side / patch_size)) * patch_size) for side in sides)
        raise ValueError(
            f"{_what(sides)} size {'x'.join(map(str, sides))} is not a multiple of the encoder's total stride "
            f"{patch_size} (the mask's patch side); resize or crop {_what(sides)}s to multiples of {patch_size}, "
            f"e.g. {near}"
        )
    return tuple(side // patch_size for side in sides)


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid ``(grid_h, grid_w)`` of an image, refusing sides that are not multiples of ``patch_size``."""
    return patch_grid_of((height, width), patch_size)


def check_mask_grid(sides: Sequence[int], patch_size: int, mask_ratio: float) -> tuple[int, ...]:
    """The one input check of masking: the patch grid of an image ``(H, W)`` or a volume ``(D, H, W)``,
    refusing sides that are not multiples of ``patch_size``, a ratio outside (0, 1) and a grid where the
    ratio hides no patch or every patch. The model checks every batch with it; the trainer checks its
    config before building."""
    grid = patch_grid_of(sides, patch_size)
    num_patches = math.prod(grid)
    num_hidden = hidden_patch_count(num_patches, mask_ratio)
    if not 0 < num_hidden < num_patches:
        raise ValueError(
            f"a {'x'.join(map(str, grid))} patch grid with mask_ratio {mask_ratio} hides {num_hidden} of "
            f"{num_patches} patches; at least one patch must be hidden and one visible: use larger "
            f"{_what(grid)}s (multiples of {patch_size}) or another mask_ratio"
        )
    return grid


def check_mask_geometry(height: int, width: int, patch_size: int, mask_ratio: float) -> tuple[int, int]:
    """:func:`check_mask_grid` for a ``height x width`` image."""
    return check_mask_grid((height, width), patch_size, mask_ratio)


def random_grid_mask(
    batch: int,
    grid: Sequence[int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool mask ``[batch, *grid]`` (a 2D ``(h, w)`` or 3D ``(d, h, w)`` patch grid), True where hidden.

    Every sample keeps exactly :func:`visible_patch_count` patches visible, chosen uniformly at
    random and independently of the other samples: the first ones of an argsort of uniform noise
    over the flattened grid, the official SparK draw, so the same CPU ``generator`` state gives the
    official code's mask.
    """
    grid = tuple(int(side) for side in grid)
    if batch < 1 or not grid or min(grid) < 1:
        raise ValueError(f"batch and grid sides must be positive (got batch={batch}, grid={'x'.join(map(str, grid))})")
    num_patches = math.prod(grid)
    num_visible = visible_patch_count(num_patches, mask_ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=noise_device)
    visible_index = noise.argsort(dim=1)[:, :num_visible]
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=noise_device)
    mask.scatter_(1, visible_index, False)
    if device is not None:
        mask = mask.to(device)
    return mask.view(batch, *grid)


def random_patch_mask(
    batch: int,
    grid_h: int,
    grid_w: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool mask ``[batch, grid_h, grid_w]``, True where a patch is hidden (:func:`random_grid_mask` in 2D)."""
    return random_grid_mask(batch, (grid_h, grid_w), mask_ratio, generator, device)


def upsample_mask(mask: torch.Tensor, factor: int, spatial_dims: int = 2) -> torch.Tensor:
    """Repeat each cell of the last ``spatial_dims`` axes of a mask into a ``factor``-sided square or cube:
    ``[B, h, w]`` or ``[B, 1, h, w]`` in 2D, ``[B, d, h, w]`` or ``[B, 1, d, h, w]`` with ``spatial_dims=3``."""
    for dim in range(-spatial_dims, 0):
        mask = mask.repeat_interleave(factor, dim=dim)
    return mask
