"""Reconstruction target and loss: per-patch normalized pixels (or voxels), MSE on hidden patches only.

Images ``[B, C, H, W]`` have square patches, volumes ``[B, C, D, H, W]`` cubic ones; the number of
spatial axes comes from the tensor's rank.
"""

from __future__ import annotations

import torch

__all__ = ["PATCH_NORM_EPS", "masked_patch_mse", "patch_stats", "patchify", "unpatchify"]

PATCH_NORM_EPS = 1e-6  # added to each patch's variance before the square root


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, h, w, p*p*C]`` and ``[B, C, D, H, W]`` -> ``[B, d, h, w, p*p*p*C]``
    (one row per patch, its pixels in raster order with the channels innermost)."""
    batch, channels, *sides = images.shape
    grid = [side // patch_size for side in sides]
    split = [n for g in grid for n in (g, patch_size)]
    x = images.reshape(batch, channels, *split)
    spatial = len(sides)
    order = [0, *range(2, 2 + 2 * spatial, 2), *range(3, 3 + 2 * spatial, 2), 1]
    return x.permute(order).reshape(batch, *grid, patch_size**spatial * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, h, w, p*p*C]`` -> ``[B, C, h*p, w*p]`` (and the same in 3D)."""
    batch, *grid, _ = patches.shape
    spatial = len(grid)
    x = patches.reshape(batch, *grid, *[patch_size] * spatial, channels)
    order = [0, 1 + 2 * spatial, *(n for axis in range(1, 1 + spatial) for n in (axis, axis + spatial))]
    return x.permute(order).reshape(batch, channels, *(g * patch_size for g in grid))


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and ``sqrt(var + eps)`` over all pixels and channels of a patch.

    ``var`` is the unbiased sample variance (``torch.var``'s default), as in official SparK and MAE.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return mean, (var + PATCH_NORM_EPS).sqrt()


def masked_patch_mse(
    pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = True
) -> torch.Tensor:
    """Mean over hidden patches of the per-patch MSE between ``pred`` and the (normalized) pixels.

    ``pred`` and ``images`` are ``[B, C, H, W]`` (or ``[B, C, D, H, W]``); ``mask`` is ``[B, h, w]``
    (or ``[B, d, h, w]``), True where hidden. With ``norm_pix`` the target of each patch is its pixels
    minus their mean over their std. Visible patches are selected out, so their gradient is exactly
    zero. (Official SparK divides by ``num_hidden + 1e-8`` computed in float32, which is ``num_hidden``
    exactly.)
    """
    target = patchify(images, patch_size)
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    per_patch = (patchify(pred, patch_size) - target).pow(2).mean(dim=-1)
    return per_patch[mask].mean()
