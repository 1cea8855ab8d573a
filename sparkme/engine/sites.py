"""From a visibility mask to the pixel sites (coordinates) the sparse encoder computes on."""

from __future__ import annotations

import torch

__all__ = ["visible_to_pixels", "visible_to_sites"]


def visible_to_pixels(visible: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Bring a visibility mask to pixel resolution.

    ``visible`` is bool ``[B, 1, h, w]`` (or ``[B, h, w]``) at patch resolution (``H`` and
    ``W`` multiples of ``h`` and ``w``) or already at pixel resolution. Returns bool
    ``[B, H, W]``, True where a pixel is visible.
    """
    if visible.dim() == 4:
        if visible.shape[1] != 1:
            raise ValueError(f"visible must be [B, 1, h, w] (one channel), got shape {tuple(visible.shape)}")
        visible = visible[:, 0]
    if visible.dim() != 3:
        raise ValueError(f"visible must be [B, 1, h, w] or [B, h, w], got shape {tuple(visible.shape)}")
    if visible.dtype != torch.bool:
        raise ValueError(f"visible must be a bool tensor (True = visible), got dtype {visible.dtype}")
    height, width = image_size
    h, w = visible.shape[-2:]
    if height % h or width % w or height // h != width // w:
        raise ValueError(
            f"visible grid {h}x{w} does not tile the {height}x{width} image with square patches; "
            "pass the mask at patch resolution (image side / patch side) or at pixel resolution"
        )
    patch = height // h
    if patch > 1:
        visible = visible.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return visible


def visible_to_sites(visible: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Coordinates ``[N, 3]`` (int32: batch, y, x) of the visible pixels, in row-major order.

    Sites come from the mask, never from feature values: a visible black pixel is still a site.
    The SparK model reuses this to know where the encoder's outputs live.
    """
    return visible_to_pixels(visible, image_size).nonzero().to(torch.int32)
