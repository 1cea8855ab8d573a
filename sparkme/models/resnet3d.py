"""A 3D residual encoder in the style of medical segmentation's (nnU-Net's residual encoder).

A 3x3x3 stride-1 stem, then stages of :class:`BasicBlock3d`; every stage after the first
halves the volume in its first block (reductions 1, 2, 4, 8, 16 with five stages). The
strided conv is a centred 3x3x3 (``downsample="conv3"``) or a 2x2x2 (``"conv2"``, kernel ==
stride, no padding); both are exact on the sparse engine when each side divides by the stride.
timm's contract makes it a SparK encoder: ``feature_info`` names the stages,
``forward_features`` runs them, ``forward`` adds global pooling and a linear head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock3d", "ResNet3d"]

_NORMS = ("batch", "instance")
_ACTS = ("relu", "leaky_relu")
_DOWNSAMPLES = ("conv3", "conv2")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """``"batch"``: BatchNorm3d; ``"instance"``: InstanceNorm3d with a learned affine."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm must be one of {_NORMS}, got {kind!r}")


def act_layer(kind: str) -> nn.Module:
    """``"relu"`` or ``"leaky_relu"`` (slope 0.01, as nnU-Net)."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    raise ValueError(f"act must be one of {_ACTS}, got {kind!r}")


def strided_conv(in_chs: int, out_chs: int, stride: int, downsample: str) -> nn.Conv3d:
    """The block's first conv: 3x3x3 (centred, padding 1) or, when strided with ``"conv2"``, 2x2x2/s2."""
    if stride > 1 and downsample == "conv2":
        return nn.Conv3d(in_chs, out_chs, kernel_size=stride, stride=stride, bias=False)
    return nn.Conv3d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock3d(nn.Module):
    """conv-norm-act-conv-norm plus a shortcut (identity, or a strided 1x1x1 conv + norm), then act."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        norm: str = "batch",
        act: str = "relu",
        downsample: str = "conv3",
    ) -> None:
        super().__init__()
        self.conv1 = strided_conv(in_chs, out_chs, stride, downsample)
        self.bn1 = norm_layer(norm, out_chs)
        self.act1 = act_layer(act)
        self.conv2 = nn.Conv3d(out_chs, out_chs, kernel_size=3, padding=1, bias=False)
        self.bn2 = norm_layer(norm, out_chs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False), norm_layer(norm, out_chs)
            )
        self.act2 = act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet3d(nn.Module):
    """Stem + ``len(widths)`` stages of ``depths[i]`` blocks; stage ``i`` has reduction ``2**i``.

    ``num_classes=0`` makes the head the identity (``forward`` returns pooled features).
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 0,
        widths: Sequence[int] = (32, 64, 128, 256, 320),
        depths: Sequence[int] = (1, 2, 2, 2, 2),
        norm: str = "batch",
        act: str = "relu",
        downsample: str = "conv3",
    ) -> None:
        super().__init__()
        widths, depths = [int(w) for w in widths], [int(d) for d in depths]
        if not widths or len(widths) != len(depths) or min(widths) < 1 or min(depths) < 1:
            raise ValueError(f"widths {widths} and depths {depths} must be equally long, positive lists")
        if downsample not in _DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {_DOWNSAMPLES}, got {downsample!r}")
        self.in_chans, self.num_classes, self.num_features = int(in_chans), int(num_classes), widths[-1]
        self.stem = nn.Sequential(
            nn.Conv3d(in_chans, widths[0], kernel_size=3, padding=1, bias=False),
            norm_layer(norm, widths[0]),
            act_layer(act),
        )
        stages, channels = [], widths[0]
        for index, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock3d(channels, width, stride, norm, act, downsample)]
            blocks += [BasicBlock3d(width, width, 1, norm, act, downsample) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            {"module": f"stages.{i}", "num_chs": width, "reduction": 2**i} for i, width in enumerate(widths)
        ]
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1))
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming-normal convs (fan-out, ReLU gain), norms weight 1 bias 0, linear head as torch's default."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d | nn.InstanceNorm3d) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh linear head for ``num_classes`` (0: identity)."""
        self.num_classes = int(num_classes)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> the last stage's map ``[B, widths[-1], D/r, H/r, W/r]``."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
