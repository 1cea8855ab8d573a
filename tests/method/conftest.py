"""Fixtures for the method tests: masked-dense stand-in encoders for images and volumes (no sparse engine needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # the helper modules beside these tests (``_compare``)
    sys.path.insert(0, _HERE)


class MaskedDenseEncoder(nn.Module):
    """Small dense CNN that zeroes hidden input pixels and every stage output at hidden sites.

    It honours the SparseEncoder contract (hidden pixels cannot reach any feature), so the method
    can be tested without the sparse engine. One stage per stride, each halving the resolution
    (the first one reaches ``strides[0]`` with a strided ``kernel = stride`` conv).
    """

    def __init__(self, strides: tuple[int, ...] = (4, 8, 16, 32), channels: tuple[int, ...] | None = None) -> None:
        super().__init__()
        channels = channels or tuple(8 * 2**i for i in range(len(strides)))
        self.feature_strides = list(strides)
        self.feature_channels = list(channels)
        self.downsample_ratio = strides[-1]
        self.norm_kind = "bn"
        stages, cin, previous = [], 3, 1
        for stride, cout in zip(strides, channels):
            step = stride // previous
            stages.append(
                nn.Sequential(
                    nn.Conv2d(cin, cout, kernel_size=step + (step == 2), stride=step, padding=int(step == 2)),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(),
                )
            )
            cin, previous = cout, stride
        self.stages = nn.ModuleList(stages)

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        def at(size: tuple[int, int]) -> torch.Tensor:
            return nn.functional.interpolate(visible.float(), size=size, mode="nearest")

        x = images * at(images.shape[-2:])
        features = []
        for stage in self.stages:
            x = stage(x)
            x = x * at(x.shape[-2:])
            features.append(x)
        return features


@pytest.fixture
def stand_in_encoder():
    """Factory: ``stand_in_encoder(strides=(4, 8, 16, 32))`` -> a fresh masked-dense encoder."""

    def build(strides: tuple[int, ...] = (4, 8, 16, 32), channels: tuple[int, ...] | None = None) -> nn.Module:
        torch.manual_seed(0)
        return MaskedDenseEncoder(strides, channels)

    return build


class MaskedDenseVolumeEncoder(nn.Module):
    """The 3D twin of :class:`MaskedDenseEncoder`: Conv3d/BatchNorm3d stages on ``[B, C, D, H, W]``
    volumes, hidden voxels zeroed at the input and every stage output zeroed at hidden sites.

    It exposes what ``sparkme.sparsify(cnn3d)`` gives (``spatial_dims = 3``, ``in_channels``), so the
    method can be tested in 3D without the sparse engine.
    """

    spatial_dims = 3

    def __init__(
        self, strides: tuple[int, ...] = (2, 4, 8), channels: tuple[int, ...] = (4, 8, 16), in_channels: int = 1
    ):
        super().__init__()
        self.feature_strides, self.feature_channels = list(strides), list(channels)
        self.downsample_ratio, self.norm_kind, self.in_channels = strides[-1], "bn", in_channels
        stages, cin, previous = [], in_channels, 1
        for stride, cout in zip(strides, channels):
            step = stride // previous
            conv = nn.Conv3d(cin, cout, kernel_size=step + (step == 2), stride=step, padding=int(step == 2))
            stages.append(nn.Sequential(conv, nn.BatchNorm3d(cout), nn.ReLU()))
            cin, previous = cout, stride
        self.stages = nn.ModuleList(stages)

    def forward(self, volumes: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        def at(size: torch.Size) -> torch.Tensor:
            return nn.functional.interpolate(visible.to(volumes.dtype), size=tuple(size), mode="nearest")

        x = volumes * at(volumes.shape[-3:])
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x * at(x.shape[-3:]))
            x = features[-1]
        return features


@pytest.fixture
def stand_in_volume_encoder():
    """Factory: ``stand_in_volume_encoder(strides=(2, 4, 8), channels=(4, 8, 16), in_channels=1)``."""

    def build(
        strides: tuple[int, ...] = (2, 4, 8), channels: tuple[int, ...] = (4, 8, 16), in_channels: int = 1
    ) -> nn.Module:
        torch.manual_seed(0)
        return MaskedDenseVolumeEncoder(strides, channels, in_channels)

    return build
