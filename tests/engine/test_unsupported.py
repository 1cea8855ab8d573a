"""Layers without exact sparse semantics are refused with the module path, type and reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparkme
from sparkme.engine import UnsupportedLayerError


def backbone(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), *layers)


@pytest.mark.parametrize(
    "layer,needle",
    [
        (nn.Upsample(scale_factor=2), "interpolation"),
        (nn.Conv2d(8, 8, 3, 1, padding=2), "not centred"),
        (nn.Conv2d(8, 8, 3, 1, 1, padding_mode="reflect"), "padding_mode"),
        (nn.MaxPool2d(3, 2, 1, ceil_mode=True), "ceil_mode"),
        (nn.AvgPool2d(3, 1, 1), "tile"),
        (nn.AdaptiveAvgPool2d(2), "output size 1"),
        (nn.ZeroPad2d((0, 1, 0, 1)), "padding"),
        (nn.Conv2d(8, 8, 4, 1, 0), "even kernel"),
    ],
)
def test_refused_at_sparsify_time(layer: nn.Module, needle: str):
    model = nn.Sequential(backbone(), layer, nn.Conv2d(8, 8, 1, 2))
    with pytest.raises(UnsupportedLayerError) as info:
        sparkme.sparsify(model, stages=["0", "2"])
    message = str(info.value)
    assert "1 (" + type(layer).__name__ + ")" in message and needle in message, message


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        return self.attn(tokens, tokens, tokens)[0].transpose(1, 2).reshape(b, c, h, w)


def test_attention_is_refused():
    model = nn.Sequential(backbone(), AttentionBlock(), nn.Conv2d(8, 8, 3, 2, 1))
    with pytest.raises(UnsupportedLayerError, match=r"1.attn \(MultiheadAttention\): attention"):
        sparkme.sparsify(model, stages=["0", "2"])


class FunctionalInterpolation(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = backbone(nn.Conv2d(8, 8, 3, 2, 1))
        self.block = nn.Conv2d(8, 8, 3, 4, 1)

    def forward(self, x):
        return self.block(F.interpolate(self.down(x), scale_factor=2.0))


def test_unknown_ops_fail_at_run_time_naming_the_op():
    encoder = sparkme.sparsify(FunctionalInterpolation(), stages=["down", "block"])
    assert encoder.feature_strides == [8, 16]
    with pytest.raises(UnsupportedLayerError, match="interpolate"):
        encoder(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 2, 2, dtype=torch.bool))


def test_runtime_errors_name_the_module():
    class Flattening(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    model = nn.Sequential(backbone(), nn.Conv2d(8, 8, 3, 2, 1), Flattening())
    encoder = sparkme.sparsify(model, stages=["1"])
    encoder.stages = [encoder.stages[0].__class__("2", 8, 8)]  # make the flattening run
    with pytest.raises(UnsupportedLayerError, match=r"flatten .*in module 2 \(Flattening\)"):
        encoder(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_resnet50d_style_ceil_mode_avg_pool_is_accepted():
    pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    encoder = sparkme.sparsify(nn.Sequential(backbone(), pool))
    assert encoder.feature_strides == [4, 8]


def test_error_type_is_public():
    assert sparkme.UnsupportedLayerError is UnsupportedLayerError
    assert issubclass(UnsupportedLayerError, ValueError)
