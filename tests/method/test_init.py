"""Initial weights follow official SparK: decoder (decoder.py ``initialize``), projections, mask tokens."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparkme.method import SparK


@pytest.fixture
def paper_sized(stand_in_encoder):
    """ResNet-50 widths (256..2048) into the paper's 768-wide decoder: large tensors, tight statistics."""
    return SparK(stand_in_encoder(channels=(256, 512, 1024, 2048)), decoder_width=768)


def _std_close(values: torch.Tensor, expected: float, what: str) -> None:
    """Sample std within 5 standard errors of ``expected`` (the error of a std estimate is ~1/sqrt(2n))."""
    values = values.detach().double().flatten()
    tolerance = 5 * expected / math.sqrt(2 * values.numel())
    assert abs(values.std().item() - expected) <= tolerance, f"{what}: std {values.std().item():.5f} vs {expected:.5f}"


def test_decoder_convs_are_normal_std_002_transposed_convs_kaiming_fan_out(paper_sized):
    for i, block in enumerate(paper_sized.decoder.blocks):
        weight = block.up.weight  # [in, out, 4, 4]: torch's fan_out is dim 0 x kernel area
        _std_close(weight, math.sqrt(2.0 / (weight.shape[0] * 16)), f"block {i} ConvTranspose2d")
        assert torch.count_nonzero(block.up.bias) == 0
        for layer in block.conv:
            if isinstance(layer, nn.Conv2d):
                _std_close(layer.weight, 0.02, f"block {i} Conv2d")
                assert layer.bias is None
            elif isinstance(layer, nn.BatchNorm2d):
                assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0)
    head = paper_sized.decoder.head
    _std_close(head.weight, 0.02, "head")  # PyTorch's default would be ~0.118 for 24 inputs
    assert torch.count_nonzero(head.bias) == 0


def test_densify_projections_keep_pytorch_default_init(paper_sized):
    """Official SparK builds its projections with nn.Conv2d(...) and never re-initializes them."""
    projections = [p for p in paper_sized.densify.projections if isinstance(p, nn.Conv2d)]
    assert len(projections) == 4  # 2048 != 768: the deepest is a 1x1 conv here
    for projection in projections:
        bound = 1.0 / math.sqrt(projection.weight[0].numel())  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), ...)
        assert projection.weight.abs().max() <= bound and projection.bias.abs().max() <= bound
        _std_close(projection.weight, bound / math.sqrt(3.0), f"projection {tuple(projection.weight.shape)}")


def test_mask_tokens_are_normal_std_002_truncated_at_plus_minus_002(paper_sized):
    tokens = torch.cat([token.detach().flatten() for token in paper_sized.densify.mask_tokens]).double()
    assert tokens.numel() == 256 + 512 + 1024 + 2048
    assert tokens.abs().max() <= 0.02 and tokens.abs().max() > 0.0195  # cut at one std, and reaching it
    phi, mass = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))
    expected = 0.02 * math.sqrt(1 - 2 * phi / mass)  # std of a standard normal truncated to [-1, 1], x 0.02
    truncated_std_error = 5 * expected / math.sqrt(2 * tokens.numel())
    assert abs(tokens.std().item() - expected) <= truncated_std_error
    assert abs(tokens.mean().item()) <= 5 * expected / math.sqrt(tokens.numel())


def test_deepest_projection_is_the_identity_only_when_widths_match(stand_in_encoder):
    same = SparK(stand_in_encoder(channels=(8, 16, 32, 64)), decoder_width=64)
    other = SparK(stand_in_encoder(channels=(8, 16, 32, 64)), decoder_width=128)
    assert isinstance(same.densify.projections[-1], nn.Identity)
    assert isinstance(other.densify.projections[-1], nn.Conv2d) and other.densify.projections[-1].kernel_size == (1, 1)
    assert "densify.projections.3.weight" not in same.state_dict()
