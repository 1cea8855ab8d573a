"""The official SparK pretraining step as written: the whole-step baseline of ``sparkme-bench``.

What keyu-tian/SparK (``pretrain/spark.py``, ``pretrain/decoder.py``) does after its masked-dense
encoder (``masked_dense.py``), in fp32 and eager mode:

- densify, per scale from the deepest: a norm over the visible sites by gather and scatter
  (``SparseBatchNorm2d`` / sparse LayerNorm: ``x.permute(0, 2, 3, 1)[visible]``, normalize, write
  into zeros), the mask token expanded to the map and ``torch.where`` by the visible map, then the
  projection (1x1 or identity at the deepest scale, 3x3 elsewhere);
- the paper's LightDecoder in NCHW: ``x = 0``; per block, add that level's map, upsample 2x by a
  transposed conv, conv3x3-BN-ReLU6-conv3x3-BN; a 1x1 conv to 3 channels;
- loss: per-patch normalized pixels, per-patch MSE, multiplied by the hidden map and divided by
  ``num_hidden + 1e-8``.

This is our own code (written from the paper and the official code's behaviour), kept apart from
``sparkme.SparK`` so that speed-ups of sparkme's method core never change the baseline. Its
parameter names and shapes are sparkme's (``densify.norms``, ``densify.mask_tokens``,
``densify.projections``, ``decoder.blocks``, ``decoder.head``), so a ``sparkme.SparK``'s densify and
decoder weights load into it and both compute the same loss and gradients (tested in float64).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OfficialSparK"]


def _gather_scatter_norm(norm: nn.Module, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """SparK's sparse norm on a dense map: gather the visible sites, normalize them, scatter into zeros."""
    sites = visible[:, 0].nonzero(as_tuple=True)
    bhwc = x.permute(0, 2, 3, 1)
    normed = norm(bhwc[sites])
    out = torch.zeros_like(bhwc)
    out[sites] = normed
    return out.permute(0, 3, 1, 2)


class _Densify(nn.Module):
    def __init__(self, channels: list[int], widths: list[int], kernels: list[int | None], norm_kind: str) -> None:
        super().__init__()
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(c) if norm_kind == "bn" else nn.LayerNorm(c, eps=1e-6) for c in channels
        )
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(c).normal_(0, 0.02)) for c in channels)
        self.projections = nn.ModuleList(
            nn.Identity() if k is None else nn.Conv2d(c, w, k, padding=k // 2)
            for c, w, k in zip(channels, widths, kernels, strict=True)
        )


class _Block(nn.Module):
    """The official ``UNetBlock``: transposed-conv 2x upsample, conv3x3-BN-ReLU6-conv3x3-BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class _Decoder(nn.Module):
    def __init__(self, width: int, num_blocks: int) -> None:
        super().__init__()
        widths = [width // 2**i for i in range(num_blocks + 1)]
        self.blocks = nn.ModuleList(_Block(cin, cout) for cin, cout in zip(widths[:-1], widths[1:]))
        self.head = nn.Conv2d(widths[-1], 3, kernel_size=1, bias=True)

    def forward(self, to_decoder: list[torch.Tensor | None]) -> torch.Tensor:
        x: torch.Tensor | int = 0
        for i, block in enumerate(self.blocks):
            if i < len(to_decoder) and to_decoder[i] is not None:
                x = x + to_decoder[i]
            x = block(x)
        return self.head(x)


def _patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    batch, channels, height, width = images.shape
    h, w = height // patch, width // patch
    x = images.reshape(batch, channels, h, patch, w, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(batch, h * w, patch * patch * channels)


class OfficialSparK(nn.Module):
    """SparK's pretraining model as written, around a masked-dense (or dense) encoder.

    ``encoder(images, visible)`` returns the feature maps, finest first (zeros at hidden sites);
    the encoder attributes are those ``sparkme.SparK`` reads. ``forward(images, mask=hidden)``
    returns ``(loss, pred, mask)`` like ``sparkme.SparK``.
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.6, decoder_width: int = 768) -> None:
        super().__init__()
        from sparkme.method.spark import decoder_levels, projection_kernels

        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.patch_size = int(encoder.downsample_ratio)
        levels = decoder_levels(list(encoder.feature_strides), self.patch_size)
        if levels != sorted(levels, reverse=True) or levels[0] != len(levels) - 1:
            raise ValueError(f"feature strides {encoder.feature_strides} must be consecutive halvings, finest first")
        num_blocks = self.patch_size.bit_length() - 1  # patch = 2**num_blocks (decoder_levels checked it)
        widths = [decoder_width // 2**level for level in levels]
        kernels = projection_kernels(levels, list(encoder.feature_channels), widths)
        self.densify = _Densify(list(encoder.feature_channels), widths, kernels, encoder.norm_kind)
        self.decoder = _Decoder(decoder_width, num_blocks)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if mask is None:
            raise ValueError("OfficialSparK needs the mask (bool [B, h, w], True = hidden)")
        active = (~mask).unsqueeze(1)  # [B, 1, h, w]
        features = list(self.encoder(images, active))[::-1]  # deepest first, as the official code
        to_decoder = []
        for i, feature in enumerate(features):
            scale = feature.shape[-1] // active.shape[-1]
            visible = active.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
            index = len(features) - 1 - i
            normed = _gather_scatter_norm(self.densify.norms[index], feature, visible)
            token = self.densify.mask_tokens[index].view(1, -1, 1, 1).expand_as(normed)
            filled = torch.where(visible.expand_as(normed), normed, token)
            to_decoder.append(self.densify.projections[index](filled))
        pred = self.decoder(to_decoder)
        target = _patchify(images, self.patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        target = (target - mean) / std
        per_patch = ((_patchify(pred, self.patch_size) - target) ** 2).mean(dim=2)
        hidden = mask.int().view(mask.shape[0], -1)
        loss = per_patch.mul_(hidden).sum() / (hidden.sum() + 1e-8)
        return loss, pred, mask
