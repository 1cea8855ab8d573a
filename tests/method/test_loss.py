"""Masked per-patch normalized pixel loss."""

from __future__ import annotations

import torch

from sparkme.method.loss import masked_patch_mse, patchify, unpatchify


def test_patchify_round_trip_non_square():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 2, 3, 8 * 8 * 3)
    assert torch.equal(patches[1, 0, 2], images[1, :, 0:8, 16:24].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 8), images)


def test_gradient_is_exactly_zero_on_visible_patches():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 3, 16, 16, requires_grad=True)
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    masked_patch_mse(pred, images, mask, 8).backward()
    grad = patchify(pred.grad, 8)
    assert torch.count_nonzero(grad[~mask]) == 0
    assert (grad[mask].abs().sum(dim=-1) > 0).all()


def test_value_matches_normalized_target_definition():
    torch.manual_seed(0)
    images, pred = torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)
    mask = torch.tensor([[[False, True]]])
    hidden = images[:, :, :, 8:]
    target = (hidden - hidden.mean()) / (hidden.var() + 1e-6).sqrt()  # unbiased variance, as official SparK
    expected = (pred[:, :, :, 8:] - target).pow(2).mean()
    assert torch.allclose(masked_patch_mse(pred, images, mask, 8), expected, atol=1e-6)
    biased = (hidden - hidden.mean()) / (hidden.var(unbiased=False) + 1e-6).sqrt()
    assert not torch.allclose(masked_patch_mse(pred, images, mask, 8), (pred[:, :, :, 8:] - biased).pow(2).mean())
    raw = (pred[:, :, :, 8:] - hidden).pow(2).mean()
    assert torch.allclose(masked_patch_mse(pred, images, mask, 8, norm_pix=False), raw, atol=1e-6)


def test_perfect_prediction_has_zero_loss():
    images = torch.randn(2, 3, 16, 16)
    patches = patchify(images, 8)
    std = (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    normalized = (patches - patches.mean(-1, keepdim=True)) / std
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    assert masked_patch_mse(unpatchify(normalized, 8), images, mask, 8).item() < 1e-10
