"""Random patch masks: which patches of each image the encoder may not see."""

from __future__ import annotations

import torch

__all__ = [
    "check_mask_geometry",
    "check_mask_ratio",
    "hidden_patch_count",
    "patch_grid",
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


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid ``(grid_h, grid_w)`` of an image, refusing sides that are not multiples of ``patch_size``."""
    if height % patch_size or width % patch_size or height <= 0 or width <= 0:
        near_h, near_w = (max(1, round(side / patch_size)) * patch_size for side in (height, width))
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the encoder's total stride {patch_size} "
            f"(the mask's patch side); resize or crop images to multiples of {patch_size}, e.g. {near_h}x{near_w}"
        )
    return height // patch_size, width // patch_size


def check_mask_geometry(height: int, width: int, patch_size: int, mask_ratio: float) -> tuple[int, int]:
    """The one input check of masking: the patch grid of a ``height x width`` image, refusing sides that
    are not multiples of ``patch_size``, a ratio outside (0, 1) and a grid where the ratio hides no patch
    or every patch. The model checks every batch with it; the trainer checks its config before building."""
    grid_h, grid_w = patch_grid(height, width, patch_size)
    num_patches = grid_h * grid_w
    num_hidden = hidden_patch_count(num_patches, mask_ratio)
    if not 0 < num_hidden < num_patches:
        raise ValueError(
            f"a {grid_h}x{grid_w} patch grid with mask_ratio {mask_ratio} hides {num_hidden} of {num_patches} "
            f"patches; at least one patch must be hidden and one visible: use larger images "
            f"(multiples of {patch_size}) or another mask_ratio"
        )
    return grid_h, grid_w


def random_patch_mask(
    batch: int,
    grid_h: int,
    grid_w: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool mask ``[batch, grid_h, grid_w]``, True where a patch is hidden.

    Every sample keeps exactly :func:`visible_patch_count` patches visible, chosen uniformly at
    random and independently of the other samples: the first ones of an argsort of uniform noise,
    the official SparK draw, so the same CPU ``generator`` state gives the official code's mask.
    """
    if batch < 1 or grid_h < 1 or grid_w < 1:
        raise ValueError(f"batch and grid sides must be positive (got batch={batch}, grid={grid_h}x{grid_w})")
    num_patches = grid_h * grid_w
    num_visible = visible_patch_count(num_patches, mask_ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=noise_device)
    visible_index = noise.argsort(dim=1)[:, :num_visible]
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=noise_device)
    mask.scatter_(1, visible_index, False)
    if device is not None:
        mask = mask.to(device)
    return mask.view(batch, grid_h, grid_w)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat each cell of a ``[B, h, w]`` (or ``[B, 1, h, w]``) mask into a ``factor x factor`` block."""
    return mask.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
