"""A tiny masked-dense stand-in for ``sparkme.SparK``: same interface, milliseconds per step.

It lets the trainer's machinery (resume, DDP, checkpoints, bad input) be tested fast and
independently of the sparse engine; the end-to-end tests use the real model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparkme.method.masking import random_patch_mask, upsample_mask

PATCH = 16


class StandInEncoder(nn.Module):
    """Two strided convs (stride 16) with BatchNorm; dense weights keyed like a dense model."""

    feature_channels = [16]
    feature_strides = [PATCH]
    downsample_ratio = PATCH
    norm_kind = "bn"
    model_name = "standin"

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 4, 4)

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        pixels = upsample_mask(visible, PATCH).to(images.dtype)
        out = self.down(F.gelu(self.bn(self.stem(images * pixels))))
        return [out * visible.to(out.dtype)]

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().clone() for key, value in self.state_dict().items()}


class StandInSpark(nn.Module):
    """``forward(images, generator) -> (loss, pred, mask)`` with per-patch normalised MSE on hidden patches.

    ``nan_at_call``: the n-th training forward (1-based) returns a NaN loss (to test the stop).
    """

    def __init__(self, mask_ratio: float = 0.6, nan_at_call: int | None = None) -> None:
        super().__init__()
        self.encoder = StandInEncoder()
        self.mask_embedding = nn.Parameter(torch.zeros(16))
        self.decoder = nn.ConvTranspose2d(16, 3, PATCH, PATCH)
        self.mask_ratio = mask_ratio
        self.nan_at_call = nan_at_call
        self.calls = 0

    def _predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visible = (~mask).unsqueeze(1)
        feature = self.encoder(images, visible)[0]
        feature = torch.where(visible, feature, self.mask_embedding.view(1, -1, 1, 1))
        return self.decoder(feature)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        batch, _, height, width = images.shape
        mask = random_patch_mask(batch, height // PATCH, width // PATCH, self.mask_ratio, generator, images.device)
        pred = self._predict(images, mask)
        target = F.unfold(images, PATCH, stride=PATCH)  # [B, 3*P*P, L]
        target = (target - target.mean(1, keepdim=True)) / (target.var(1, keepdim=True) + 1e-6).sqrt()
        per_patch = (F.unfold(pred, PATCH, stride=PATCH) - target).pow(2).mean(1)
        hidden = mask.flatten(1).float()
        loss = (per_patch * hidden).sum() / hidden.sum()
        if self.training:
            self.calls += 1
            if self.nan_at_call is not None and self.calls >= self.nan_at_call:
                loss = loss * float("nan")
        return loss, pred, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor | None = None, generator=None):
        batch, _, height, width = images.shape
        if mask is None:
            mask = random_patch_mask(batch, height // PATCH, width // PATCH, self.mask_ratio, generator, images.device)
        pred = self._predict(images, mask)
        hidden = upsample_mask(mask, PATCH).unsqueeze(1)
        return {
            "input": images,
            "masked": images.masked_fill(hidden, 0.0),
            "reconstruction": torch.where(hidden, pred, images),
            "mask": mask,
        }
