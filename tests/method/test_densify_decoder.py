"""Densify (active-site norm + mask embeddings + projection) and the LightDecoder."""

from __future__ import annotations

import pytest
import torch

from sparkme.method import LightDecoder
from sparkme.method.densify import Densify


def _scale(visible_fraction: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    visible = torch.rand(2, 6, 5, generator=generator) < visible_fraction
    features = torch.randn(2, 4, 6, 5, generator=generator) * 3 + 2
    return features * visible.unsqueeze(1), visible


@pytest.mark.parametrize("norm_kind", ["bn", "ln"])
def test_hidden_sites_hold_the_mask_embedding_and_ignore_feature_values(norm_kind):
    torch.manual_seed(0)
    densify = Densify([4], [7], norm_kind, [3])
    features, visible = _scale()
    dense = densify.densify_scale(0, features, visible)
    token = densify.mask_tokens[0].detach()
    assert torch.equal(dense.permute(0, 2, 3, 1)[~visible], token.expand(int((~visible).sum()), 4))
    noisy = features + torch.randn_like(features) * (~visible).unsqueeze(1)  # change hidden sites only
    assert torch.equal(densify.densify_scale(0, noisy, visible), dense)
    assert densify([features], [visible])[0].shape == (2, 7, 6, 5)


def test_batchnorm_statistics_come_from_visible_sites_only():
    densify = Densify([4], [4], "bn", [1]).train()
    features, visible = _scale(visible_fraction=0.3)
    active = densify.densify_scale(0, features, visible).permute(0, 2, 3, 1)[visible]
    assert torch.allclose(active.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(active.var(0, unbiased=False), torch.ones(4), atol=1e-3)
    expected_running_mean = 0.1 * features.permute(0, 2, 3, 1)[visible].mean(0)
    assert torch.allclose(densify.norms[0].running_mean, expected_running_mean, atol=1e-6)


def test_layernorm_normalizes_each_visible_site_over_channels():
    densify = Densify([4], [4], "ln", [1])
    features, visible = _scale()
    active = densify.densify_scale(0, features, visible).permute(0, 2, 3, 1)[visible]
    assert torch.allclose(active.mean(-1), torch.zeros(len(active)), atol=1e-5)


def test_mask_embeddings_are_named_learnable_parameters_per_scale():
    densify = Densify([4, 8], [16, 8], "bn", [3, 1])
    names = dict(densify.named_parameters())
    assert names["mask_tokens.0"].shape == (4,) and names["mask_tokens.1"].shape == (8,)
    assert all(p.requires_grad for p in densify.mask_tokens)
    assert [p.kernel_size for p in densify.projections] == [(3, 3), (1, 1)]
    with pytest.raises(ValueError, match="norm_kind"):
        Densify([4], [4], "gn", [1])


def test_paper_decoder_widths_and_output_shape():
    decoder = LightDecoder(768, 32)
    assert decoder.level_widths == [768, 384, 192, 96, 48, 24]
    assert decoder.level_strides == [32, 16, 8, 4, 2, 1]
    block = decoder.blocks[0]
    assert (block.up.kernel_size, block.up.stride) == ((4, 4), (2, 2))
    layers = [type(m).__name__ for m in block.conv]
    assert layers == ["Conv2d", "BatchNorm2d", "ReLU6", "Conv2d", "BatchNorm2d"]
    assert decoder.head.kernel_size == (1, 1) and decoder.head.out_channels == 3


def test_decoder_adds_features_at_their_levels():
    torch.manual_seed(0)
    decoder = LightDecoder(32, 8).eval()
    deepest = torch.randn(1, 32, 2, 3)
    level_two = torch.randn(1, 8, 8, 12)
    out = decoder([deepest, None, level_two])
    assert out.shape == (1, 3, 16, 24)
    assert not torch.equal(out, decoder([deepest]))
    full = decoder([deepest, None, level_two, torch.randn(1, 4, 16, 24)])  # stride-1 level before the head
    assert full.shape == (1, 3, 16, 24) and not torch.equal(full, out)


def test_decoder_refuses_bad_configuration():
    with pytest.raises(ValueError, match="power of two"):
        LightDecoder(64, 12)
    with pytest.raises(ValueError, match="zero channels"):
        LightDecoder(16, 32)
    with pytest.raises(ValueError, match="deepest level"):
        LightDecoder(16, 4)([None, torch.zeros(1, 8, 2, 2)])


def test_batchnorm_with_a_single_visible_site_is_a_clear_error():
    densify = Densify([4], [4], "bn", [1]).train()
    visible = torch.zeros(1, 2, 2, dtype=torch.bool)
    visible[0, 0, 0] = True
    with pytest.raises(ValueError, match="1 visible site"):
        densify([torch.randn(1, 4, 2, 2)], [visible])
    assert densify.eval()([torch.randn(1, 4, 2, 2)], [visible])[0].shape == (1, 4, 2, 2)
