"""Reconstruction target and loss: per-patch normalized pixels, MSE on hidden patches only."""

from __future__ import annotations

import torch

__all__ = ["PATCH_NORM_EPS", "masked_patch_mse", "patch_stats", "patchify", "unpatchify"]

PATCH_NORM_EPS = 1e-6  # added to each patch's variance before the square root


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, h, w, patch_size * patch_size * C]`` (one row per patch)."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h, grid_w, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, h, w, p*p*C]`` -> ``[B, C, h*p, w*p]``."""
    batch, grid_h, grid_w, _ = patches.shape
    x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid_h * patch_size, grid_w * patch_size)


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

    ``pred`` and ``images`` are ``[B, 3, H, W]``; ``mask`` is ``[B, h, w]``, True where hidden. With
    ``norm_pix`` the target of each patch is its pixels minus their mean over their std. Visible
    patches are selected out, so their gradient is exactly zero. (Official SparK divides by
    ``num_hidden + 1e-8`` computed in float32, which is ``num_hidden`` exactly.)
    """
    target = patchify(images, patch_size)
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    per_patch = (patchify(pred, patch_size) - target).pow(2).mean(dim=-1)
    return per_patch[mask].mean()
