"""LightDecoder: the paper's light UNet decoder (appendix A), for any number of scales, in 2D or 3D."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LightDecoder", "UpBlock", "dense_layers", "init_decoder_weights"]

# (conv, transposed conv, BatchNorm) for images (2) and volumes (3)
LAYERS = {
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d),
}


def init_decoder_weights(module: nn.Module) -> None:
    """Official SparK decoder init for every submodule of ``module``.

    Conv2d/Conv3d and Linear: truncated normal std 0.02 (cut at +-2, i.e. plain normal), bias 0;
    ConvTranspose2d/3d: Kaiming normal (fan_out, ReLU gain), bias 0; BatchNorm and LayerNorm: 1 and 0.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Conv3d | nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
        elif isinstance(layer, nn.ConvTranspose2d | nn.ConvTranspose3d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
            nn.init.ones_(layer.weight)
        else:
            continue
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def dense_layers(spatial_dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """``(conv, transposed conv, BatchNorm)`` of images (2) or volumes (3); any other rank is refused."""
    if spatial_dims not in LAYERS:
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims}")
    return LAYERS[spatial_dims]


class UpBlock(nn.Module):
    """2x transposed-conv upsample, then conv3x3-BN-ReLU6-conv3x3-BN (``cin`` -> ``cout`` channels);
    3x3x3 convolutions and BatchNorm3d with ``spatial_dims=3``."""

    def __init__(self, cin: int, cout: int, spatial_dims: int = 2) -> None:
        super().__init__()
        conv, transposed, norm = dense_layers(spatial_dims)
        self.up = transposed(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            conv(cin, cin, kernel_size=3, padding=1, bias=False),
            norm(cin),
            nn.ReLU6(inplace=True),
            conv(cin, cout, kernel_size=3, padding=1, bias=False),
            norm(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """Upsample from stride ``upsample_ratio`` to the input resolution, adding features on the way.

    There are ``n = log2(upsample_ratio)`` blocks and ``n + 1`` levels; level ``i`` sits at stride
    ``upsample_ratio / 2**i`` with ``width // 2**i`` channels (``level_widths``). ``forward(features)``
    takes one tensor (or ``None``) per level, deepest first; a tensor at level ``i`` is added before
    block ``i`` (level ``n``, stride 1, is added before the final 1x1 conv to ``out_channels``).
    ``LightDecoder(768, 32)`` is the paper's decoder: widths 768, 384, 192, 96, 48, 24. Weights
    start from :func:`init_decoder_weights` (the official rule). ``spatial_dims=3`` is the same
    decoder for volumes (transposed 4x4x4 upsample, 3x3x3 convs, BatchNorm3d, 1x1x1 head).
    """

    def __init__(
        self, width: int = 768, upsample_ratio: int = 32, out_channels: int = 3, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        conv = dense_layers(spatial_dims)[0]
        num_blocks = round(math.log2(upsample_ratio)) if upsample_ratio >= 1 else -1
        if upsample_ratio < 1 or 2**num_blocks != upsample_ratio:
            raise ValueError(f"upsample_ratio must be a power of two >= 1 (got {upsample_ratio})")
        if width // 2**num_blocks < 1:
            raise ValueError(
                f"decoder width {width} halves {num_blocks} times to zero channels; use a width >= {2**num_blocks}"
            )
        self.width = width
        self.upsample_ratio = upsample_ratio
        self.spatial_dims = spatial_dims
        self.level_widths = [width // 2**i for i in range(num_blocks + 1)]
        self.blocks = nn.ModuleList(
            UpBlock(cin, cout, spatial_dims) for cin, cout in zip(self.level_widths[:-1], self.level_widths[1:])
        )
        self.head = conv(self.level_widths[-1], out_channels, kernel_size=1, bias=True)
        init_decoder_weights(self)

    @property
    def level_strides(self) -> list[int]:
        """Stride (w.r.t. the input image) of each level, deepest first."""
        return [self.upsample_ratio // 2**i for i in range(len(self.level_widths))]

    def forward(self, features: list[torch.Tensor | None]) -> torch.Tensor:
        if len(features) > len(self.level_widths):
            raise ValueError(f"got {len(features)} feature levels; this decoder has {len(self.level_widths)}")
        if not features or features[0] is None:
            raise ValueError("the deepest level (stride upsample_ratio) must be given: it starts the decoder")
        x = features[0]
        for i, block in enumerate(self.blocks):
            if i > 0 and i < len(features) and features[i] is not None:
                x = x + features[i]
            x = block(x)
        if len(features) == len(self.level_widths) and features[-1] is not None:
            x = x + features[-1]
        return self.head(x)
