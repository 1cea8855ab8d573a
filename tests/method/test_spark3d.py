"""SparK on volumes: cubic patch masks, the voxel loss against a float64 reference, 3D densify and
decoder, the whole model on a masked-dense Conv3d stand-in encoder (and on its sparse maps)."""

from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparkme.method import LightDecoder, SparK, random_patch_mask
from sparkme.method.densify import Densify
from sparkme.method.loss import masked_patch_mse, patchify, unpatchify
from sparkme.method.masking import check_mask_grid, patch_grid_of, random_grid_mask, upsample_mask


def _volumes(batch: int = 2, side: tuple[int, int, int] = (16, 16, 24), channels: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *side, generator=generator) * 2 + 1


# ---- masks --------------------------------------------------------------------------------------


def test_volume_masks_hide_exactly_round_l_ratio_cubes_per_volume():
    mask = random_grid_mask(6, (3, 4, 5), 0.6, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (6, 3, 4, 5)
    assert mask.flatten(1).sum(1).tolist() == [60 - round(60 * 0.4)] * 6  # 36 of 60
    assert len({tuple(row.tolist()) for row in mask.flatten(1)}) == 6  # independent per volume
    again = random_grid_mask(6, (3, 4, 5), 0.6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


def test_every_cube_equally_likely():
    mask = random_grid_mask(20000, (2, 2, 2), 0.6, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mask.float().mean(0), torch.full((2, 2, 2), 5 / 8), atol=0.015)  # 8 - round(3.2)


def test_the_2d_mask_is_the_n_d_draw_on_a_2d_grid():
    first = random_patch_mask(4, 3, 5, 0.6, generator=torch.Generator().manual_seed(2))
    second = random_grid_mask(4, (3, 5), 0.6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)


def test_volume_geometry_checks():
    assert patch_grid_of((32, 64, 96), 32) == (1, 2, 3)
    with pytest.raises(ValueError, match="volume size 32x64x90 is not a multiple of the encoder.s total stride 32"):
        patch_grid_of((32, 64, 90), 32)
    assert check_mask_grid((16, 16, 16), 8, 0.6) == (2, 2, 2)
    with pytest.raises(ValueError, match="1x1x2 patch grid with mask_ratio 0.9 hides 2 of 2"):
        check_mask_grid((8, 8, 16), 8, 0.9)


def test_upsample_mask_makes_cubes():
    mask = torch.tensor([[[[True, False]]]])  # [1, 1, 1, 2]: d, h, w
    up = upsample_mask(mask, 2, spatial_dims=3)
    assert up.shape == (1, 2, 2, 4)
    assert up[..., :2].all() and not up[..., 2:].any()
    assert upsample_mask(mask.unsqueeze(1), 3, spatial_dims=3).shape == (1, 1, 3, 3, 6)


# ---- loss ---------------------------------------------------------------------------------------


def test_patchify_volumes_round_trip_and_order():
    volumes = _volumes(2, (8, 16, 24), channels=2)
    patches = patchify(volumes, 8)
    assert patches.shape == (2, 1, 2, 3, 8 * 8 * 8 * 2)
    assert torch.equal(patches[1, 0, 1, 2], volumes[1, :, 0:8, 8:16, 16:24].permute(1, 2, 3, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 8, channels=2), volumes)


def _reference_loss(pred: torch.Tensor, volumes: torch.Tensor, mask: torch.Tensor, patch: int, norm: bool) -> float:
    """The masked norm-voxel MSE written out cube by cube in float64 (unbiased variance, eps 1e-6)."""
    total, count = 0.0, 0
    for b, z, y, x in itertools.product(*(range(n) for n in mask.shape)):
        if not mask[b, z, y, x]:
            continue
        cube = (slice(z * patch, (z + 1) * patch), slice(y * patch, (y + 1) * patch), slice(x * patch, (x + 1) * patch))
        target = volumes[b, :, cube[0], cube[1], cube[2]].double()
        if norm:
            target = (target - target.mean()) / (target.var() + 1e-6).sqrt()
        total += float((pred[b, :, cube[0], cube[1], cube[2]].double() - target).pow(2).mean())
        count += 1
    return total / count


@pytest.mark.parametrize("norm", [True, False])
def test_voxel_loss_equals_a_float64_reference(norm):
    volumes, pred = _volumes(2, (8, 16, 16), channels=2, seed=1), _volumes(2, (8, 16, 16), channels=2, seed=2)
    mask = random_grid_mask(2, (1, 2, 2), 0.5, generator=torch.Generator().manual_seed(3))
    expected = _reference_loss(pred, volumes, mask, 8, norm)
    exact = masked_patch_mse(pred.double(), volumes.double(), mask, 8, norm_pix=norm).item()
    assert abs(exact - expected) <= 1e-12 * expected
    single = masked_patch_mse(pred, volumes, mask, 8, norm_pix=norm).item()
    assert abs(single - expected) <= 1e-5 * expected  # float32 round-off over 1024-value cubes
    shifted = _reference_loss(pred, volumes.roll(1, dims=-1), mask, 8, norm)
    assert abs(shifted - expected) > 1e-3 * expected  # the reference tells different targets apart


def test_voxel_loss_gradient_is_zero_on_visible_cubes():
    volumes = _volumes(2, (8, 16, 16))
    pred = _volumes(2, (8, 16, 16), seed=4).requires_grad_()
    mask = torch.tensor([[[[True, False], [False, True]]], [[[False, False], [True, False]]]])
    masked_patch_mse(pred, volumes, mask, 8).backward()
    grad = patchify(pred.grad, 8)
    assert torch.count_nonzero(grad[~mask]) == 0 and (grad[mask].abs().sum(-1) > 0).all()


# ---- densify and decoder -------------------------------------------------------------------------


@pytest.mark.parametrize("norm_kind", ["bn", "ln"])
def test_densify_volumes_fills_hidden_sites_with_the_token(norm_kind):
    torch.manual_seed(0)
    densify = Densify([4, 8], [6, 8], norm_kind, [3, 1], spatial_dims=3).train()
    visible = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    features = _volumes(2, (3, 4, 5), channels=4) * visible.unsqueeze(1)
    dense = densify.densify_scale(0, features, visible)
    sites = dense.movedim(1, -1)
    assert torch.equal(sites[~visible], densify.mask_tokens[0].detach().expand(int((~visible).sum()), 4))
    if norm_kind == "bn":  # batch statistics over visible sites only
        assert torch.allclose(sites[visible].mean(0), torch.zeros(4), atol=1e-5)
    assert [type(p) for p in densify.projections] == [nn.Conv3d, nn.Conv3d]
    assert [p.kernel_size for p in densify.projections] == [(3, 3, 3), (1, 1, 1)]
    assert densify([features, torch.zeros(2, 8, 3, 4, 5)], [visible, visible])[0].shape == (2, 6, 3, 4, 5)
    with pytest.raises(ValueError, match="do not match the visible map"):
        densify.densify_scale(0, features[:, :, 0], visible[:, 0])


def _expected_decoder_parameters(widths: list[int], out_channels: int, kernel_volume: int) -> int:
    """Transposed 4^n conv with bias, two 3^n convs without, two BatchNorms per block; 1x1 head with bias."""
    up = 4**2 if kernel_volume == 9 else 4**3
    count = sum(
        cin * cin * up + cin + cin * cin * kernel_volume + 2 * cin + cin * cout * kernel_volume + 2 * cout
        for cin, cout in zip(widths[:-1], widths[1:])
    )
    return count + widths[-1] * out_channels + out_channels


def test_volume_decoder_layers_shapes_and_parameter_count():
    decoder = LightDecoder(64, 8, out_channels=2, spatial_dims=3).eval()
    assert decoder.level_widths == [64, 32, 16, 8] and decoder.level_strides == [8, 4, 2, 1]
    block = decoder.blocks[0]
    assert type(block.up) is nn.ConvTranspose3d and (block.up.kernel_size, block.up.stride) == ((4,) * 3, (2,) * 3)
    assert [type(m).__name__ for m in block.conv] == ["Conv3d", "BatchNorm3d", "ReLU6", "Conv3d", "BatchNorm3d"]
    assert type(decoder.head) is nn.Conv3d and decoder.head.kernel_size == (1, 1, 1) and decoder.head.out_channels == 2
    parameters = sum(p.numel() for p in decoder.parameters())
    assert parameters == _expected_decoder_parameters(decoder.level_widths, 2, 27)
    paper_2d = sum(p.numel() for p in LightDecoder(768, 32).parameters())
    assert paper_2d == _expected_decoder_parameters([768, 384, 192, 96, 48, 24], 3, 9)
    names_2d = [name for name, _ in LightDecoder(64, 8).named_parameters()]
    assert names_2d == [name for name, _ in decoder.named_parameters()]  # same names as the 2D decoder
    out = decoder([torch.randn(1, 64, 1, 2, 3), None, torch.randn(1, 16, 4, 8, 12)])
    assert out.shape == (1, 2, 8, 16, 24)


def test_volume_decoder_follows_the_official_init():
    decoder = LightDecoder(128, 4, spatial_dims=3)
    up = decoder.blocks[0].up.weight  # [in, out, 4, 4, 4]: fan_out = dim 0 x 64
    assert abs(up.std().item() - (2.0 / (up.shape[0] * 64)) ** 0.5) < 0.05 * (2.0 / (up.shape[0] * 64)) ** 0.5
    conv = decoder.blocks[0].conv[0].weight
    assert abs(conv.std().item() - 0.02) < 0.05 * 0.02
    assert torch.count_nonzero(decoder.blocks[0].up.bias) == 0 and torch.count_nonzero(decoder.head.bias) == 0


# ---- the model ----------------------------------------------------------------------------------


def test_volume_model_shapes_counts_and_gradients(stand_in_volume_encoder):
    model = SparK(stand_in_volume_encoder(), mask_ratio=0.6, decoder_width=32)
    assert (model.spatial_dims, model.in_channels, model.patch_size, model.levels) == (3, 1, 8, [2, 1, 0])
    volumes = _volumes(2, (16, 16, 24))
    loss, pred, mask = model(volumes, generator=torch.Generator().manual_seed(0))
    assert pred.shape == volumes.shape and mask.shape == (2, 2, 2, 3) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [12 - round(12 * 0.4)] * 2
    assert abs(loss.item() - _reference_loss(pred.detach(), volumes, mask, 8, True)) <= 1e-5 * loss.item()
    loss.backward()
    assert all(token.grad is not None and token.grad.abs().sum() > 0 for token in model.densify.mask_tokens)
    for name in ("encoder.stages.0.0.weight", "densify.projections.0.weight", "decoder.blocks.0.up.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_hidden_voxels_reach_the_loss_only_through_the_target(stand_in_volume_encoder):
    model = SparK(stand_in_volume_encoder(), decoder_width=16)
    volumes = _volumes(2, (16, 16, 16))
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 1] = mask[0, 1, 1, 0] = mask[1, 0, 1, 1] = mask[1, 1, 0, 0] = mask[1, 0, 0, 0] = True
    hidden = upsample_mask(mask, 8, spatial_dims=3).unsqueeze(1)
    changed = torch.where(hidden, torch.randn_like(volumes), volumes)
    loss, pred, _ = model(volumes, mask=mask)
    loss_changed, pred_changed, _ = model(changed, mask=mask)
    assert torch.equal(pred, pred_changed) and not torch.equal(loss, loss_changed)


def test_multi_channel_volumes_are_reconstructed_channel_for_channel(stand_in_volume_encoder):
    model = SparK(stand_in_volume_encoder(in_channels=2), decoder_width=16).eval()
    volumes = _volumes(1, (16, 16, 16), channels=2)
    out = model.reconstruct(volumes, generator=torch.Generator().manual_seed(0))
    assert model.decoder.head.out_channels == 2 and out["reconstruction"].shape == volumes.shape
    hidden = upsample_mask(out["mask"], 8, spatial_dims=3).unsqueeze(1).expand_as(volumes)
    assert torch.equal(out["reconstruction"][~hidden], volumes[~hidden])
    assert torch.count_nonzero(out["masked"][hidden]) == 0 and torch.equal(out["masked"][~hidden], volumes[~hidden])
    assert not torch.equal(out["reconstruction"][hidden], volumes[hidden])


def test_volume_inputs_are_checked(stand_in_volume_encoder):
    model = SparK(stand_in_volume_encoder(), decoder_width=16)
    with pytest.raises(ValueError, match=r"volumes \[B, 1, D, H, W\]"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"volumes \[B, 1, D, H, W\]"):
        model(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="volume size 16x16x20"):
        model(torch.randn(1, 1, 16, 16, 20))
    with pytest.raises(ValueError, match="mask must be bool"):
        model(torch.randn(1, 1, 16, 16, 16), mask=torch.zeros(1, 2, 2, dtype=torch.bool))
    encoder = stand_in_volume_encoder()
    del encoder.in_channels
    with pytest.raises(TypeError, match="in_channels"):
        SparK(encoder)


def test_an_image_encoder_must_take_rgb():
    grey = nn.Module()
    grey.feature_channels, grey.feature_strides, grey.downsample_ratio, grey.norm_kind = [8], [8], 8, "bn"
    grey.in_channels = 1
    with pytest.raises(ValueError, match="takes 1 input channels"):
        SparK(grey)


class MapsEncoder(nn.Module):
    """The stand-in plus ``forward_maps``: each scale's visible sites as rows with ``[batch, z, y, x]``
    coordinates in finest-grid units, as a sparse encoder's maps give them."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.inner = encoder
        for name in ("feature_channels", "feature_strides", "downsample_ratio", "norm_kind", "in_channels"):
            setattr(self, name, getattr(encoder, name))
        self.spatial_dims = 3

    def forward(self, volumes: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        return self.inner(volumes, visible)

    def forward_maps(self, volumes: torch.Tensor, visible: torch.Tensor) -> list[SimpleNamespace]:
        maps = []
        for dense, stride in zip(self.inner(volumes, visible), self.feature_strides):
            at = upsample_mask(visible[:, 0], self.downsample_ratio // stride, spatial_dims=3)
            sites = at.nonzero()
            coords = torch.cat([sites[:, :1], sites[:, 1:] * stride], dim=1)
            ctx = SimpleNamespace(coordinates=lambda key, coords=coords: coords, batch_size=volumes.shape[0])
            features = dense.movedim(1, -1)[at]
            maps.append(SimpleNamespace(features=features, key=None, tensor_stride=(stride,) * 3, ctx=ctx))
            maps[-1].spatial_size = tuple(dense.shape[2:])
        return maps


def _step(model: nn.Module, from_maps: bool, channels_last: bool) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    model.densify_from_maps, model.channels_last = from_maps, channels_last
    volumes = _volumes(2, (16, 16, 24)).double().requires_grad_()
    loss, pred, _ = model(volumes, generator=torch.Generator().manual_seed(5))
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "pred": pred.detach(), "volumes": volumes.grad, **grads}


def test_sparse_maps_and_channels_last_3d_change_no_number(stand_in_volume_encoder):
    """float64: densify from the maps' rows (N-d active_rows) and the channels_last_3d dense part
    give the dense path's loss, prediction and every gradient."""
    model = SparK(MapsEncoder(stand_in_volume_encoder()), decoder_width=16).double()
    reference = _step(model, from_maps=False, channels_last=False)
    for from_maps, channels_last in ((True, False), (False, True), (True, True)):
        result = _step(model, from_maps, channels_last)
        assert result.keys() == reference.keys()
        floor = 1e-3 * max(float(v.abs().max()) for v in reference.values())
        for key, expected in reference.items():
            error = float((result[key] - expected).abs().max()) / max(float(expected.abs().max()), floor)
            assert error <= 1e-10, f"{key} ({from_maps=}, {channels_last=}): {error:.1e}"
