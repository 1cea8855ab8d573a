"""From a visibility mask to the pixel (or voxel) sites the sparse encoder computes on."""

from __future__ import annotations

import torch

__all__ = ["visible_to_pixels", "visible_to_sites"]


def visible_to_pixels(visible: torch.Tensor, image_size: tuple[int, ...]) -> torch.Tensor:
    """Bring a visibility mask to pixel resolution.

    ``visible`` is bool ``[B, 1, *grid]`` (or ``[B, *grid]``) at patch resolution (every side of
    ``image_size`` the same multiple of the grid's) or already at pixel resolution; ``image_size``
    is ``(H, W)`` for images, ``(D, H, W)`` for volumes. Returns bool ``[B, *image_size]``, True
    where a pixel is visible.
    """
    dims = len(image_size)
    shape = "[B, 1, " + ", ".join("dhw"[3 - dims :]) + "]"
    if visible.dim() == dims + 2:
        if visible.shape[1] != 1:
            raise ValueError(f"visible must be {shape} (one channel), got shape {tuple(visible.shape)}")
        visible = visible[:, 0]
    if visible.dim() != dims + 1:
        raise ValueError(f"visible must be {shape} or without the channel dim, got shape {tuple(visible.shape)}")
    if visible.dtype != torch.bool:
        raise ValueError(f"visible must be a bool tensor (True = visible), got dtype {visible.dtype}")
    grid = tuple(visible.shape[1:])
    ratios = {side // cells if cells and side % cells == 0 else 0 for side, cells in zip(image_size, grid)}
    if len(ratios) != 1 or 0 in ratios:
        size = "x".join(str(s) for s in image_size)
        raise ValueError(
            f"visible grid {'x'.join(str(g) for g in grid)} does not tile the {size} input with "
            f"{'cubic' if dims == 3 else 'square'} patches; pass the mask at patch resolution "
            "(input side / patch side) or at pixel resolution"
        )
    patch = ratios.pop()
    for axis in range(1, dims + 1) if patch > 1 else ():
        visible = visible.repeat_interleave(patch, dim=axis)
    return visible


def visible_to_sites(visible: torch.Tensor, image_size: tuple[int, ...]) -> torch.Tensor:
    """Coordinates ``[N, 1 + dims]`` (int32: batch, then each spatial axis) of the visible pixels, in
    row-major order.

    Sites come from the mask, never from feature values: a visible black pixel is still a site.
    The SparK model reuses this to know where the encoder's outputs live.
    """
    return visible_to_pixels(visible, image_size).nonzero().to(torch.int32)
