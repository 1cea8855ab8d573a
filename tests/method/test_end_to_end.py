"""SparK on real sparse encoders (sparkme.sparsify on MinkowskiEngine): shapes, independence, overfitting."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from torch import nn

import sparkme
from sparkme.method import SparK


def demo_batch(count: int, image_size: int) -> torch.Tensor:
    """``count`` normalized demo images ``[count, 3, S, S]`` (the built-in procedural data set)."""
    from torchvision import transforms

    from sparkme.data.demo import DemoDataset

    to_tensor = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    data = DemoDataset(length=count, image_size=image_size, seed=0, transform=to_tensor)
    return torch.stack([data[i][0] for i in range(count)])


class UserCNN(nn.Module):
    """A user's plain CNN: five stride-2 conv stages (strides 2, 4, 8, 16, 32), returns the last map."""

    def __init__(self) -> None:
        super().__init__()
        widths = [3, 8, 16, 24, 32, 40]
        self.stages = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
                for cin, cout in zip(widths[:-1], widths[1:])
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


def _hidden_pixels(mask: torch.Tensor, patch: int) -> torch.Tensor:
    return mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)


@pytest.mark.parametrize(
    ("name", "channels", "strides", "norm_kind"),
    [
        ("resnet50", [256, 512, 1024, 2048], [4, 8, 16, 32], "bn"),
        ("convnext_tiny", [96, 192, 384, 768], [4, 8, 16, 32], "ln"),
    ],
)
def test_timm_encoders_wire_into_the_decoder(name, channels, strides, norm_kind):
    torch.manual_seed(0)
    encoder = sparkme.sparsify(timm.create_model(name, pretrained=False))
    assert (encoder.feature_channels, encoder.feature_strides, encoder.norm_kind) == (channels, strides, norm_kind)
    model = SparK(encoder, decoder_width=768)
    assert model.decoder.level_widths == [768, 384, 192, 96, 48, 24]
    projections = list(model.densify.projections)
    if channels[-1] == 768:  # deepest width equals the decoder's: identity, as official SparK (ConvNeXt-T/S)
        assert isinstance(projections.pop(), torch.nn.Identity)
    assert [p.in_channels for p in projections] == channels[: len(projections)]
    assert [p.out_channels for p in projections] == [96, 192, 384, 768][: len(projections)]
    loss, pred, mask = model(torch.randn(1, 3, 64, 96), generator=torch.Generator().manual_seed(0))
    assert pred.shape == (1, 3, 64, 96) and mask.shape == (1, 2, 3) and int(mask.sum()) == 4
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("stages", "strides", "levels", "size"),
    [
        ([0, 1, 2, 3], [2, 4, 8, 16], [3, 2, 1, 0], (32, 48)),
        ([2, 3, 4], [8, 16, 32], [2, 1, 0], (64, 96)),
    ],
)
def test_user_cnn_with_unusual_strides(stages, strides, levels, size):
    torch.manual_seed(0)
    encoder = sparkme.sparsify(UserCNN(), stages=[f"stages.{i}" for i in stages])
    assert encoder.feature_strides == strides and encoder.downsample_ratio == strides[-1]
    model = SparK(encoder, decoder_width=64)
    assert model.levels == levels and 2 ** len(model.decoder.blocks) == strides[-1]  # up to full resolution
    loss, pred, mask = model(torch.randn(2, 3, *size))
    assert pred.shape == (2, 3, *size) and mask.shape == (2, size[0] // strides[-1], size[1] // strides[-1])
    loss.backward()
    assert all(token.grad is not None for token in model.densify.mask_tokens)


def test_hidden_pixels_change_neither_features_nor_prediction():
    torch.manual_seed(0)
    model = SparK(sparkme.sparsify(timm.create_model("resnet18", pretrained=False)), decoder_width=64)
    images = torch.randn(2, 3, 64, 96)
    mask = model.sample_mask(images, torch.Generator().manual_seed(0))
    changed = torch.where(_hidden_pixels(mask, 32), torch.randn_like(images) * 5, images)
    visible = ~mask.unsqueeze(1)
    with torch.no_grad():
        features = model.encoder(images, visible)
        for before, after, stride in zip(features, model.encoder(changed, visible), model.feature_strides):
            assert torch.equal(before, after)
            hidden_sites = _hidden_pixels(mask, 32 // stride)  # the densify's idea of hidden sites
            assert torch.count_nonzero(before * hidden_sites) == 0
            assert torch.count_nonzero(before * ~hidden_sites) > 0
    loss, pred, _ = model(images, mask=mask)
    loss_changed, pred_changed, _ = model(changed, mask=mask)
    assert torch.equal(pred, pred_changed)
    assert not torch.equal(loss, loss_changed)  # the hidden pixels are the target


@pytest.mark.slow
def test_resnet18_overfits_four_demo_images():
    """Fixed batch of 4 demo images at 64x64 and a fixed mask: the loss must fall by >= 90%."""
    steps = 60
    torch.manual_seed(0)
    images = demo_batch(4, 64)
    model = SparK(sparkme.sparsify(timm.create_model("resnet18", pretrained=False)), decoder_width=256)
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=2e-3)
    mask = model.sample_mask(images, torch.Generator().manual_seed(0))
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        loss, _, _ = model(images, mask=mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    first, last = losses[0], sum(losses[-5:]) / 5
    print(f"overfit: loss {first:.4f} -> {last:.4f} ({last / first:.1%}) in {steps} steps, {elapsed:.1f} s")
    assert last <= 0.1 * first
