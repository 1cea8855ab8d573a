"""Patch masks: exact count, uniform, reproducible, clear errors."""

from __future__ import annotations

import pytest
import torch

from sparkme.method import random_patch_mask
from sparkme.method.masking import check_mask_geometry, hidden_patch_count, patch_grid, upsample_mask
from sparkme.training.inputs import pretraining_inputs


def test_exact_hidden_count_per_sample_non_square():
    mask = random_patch_mask(16, 7, 5, 0.6)
    assert mask.dtype == torch.bool and mask.shape == (16, 7, 5)
    assert mask.flatten(1).sum(dim=1).tolist() == [round(35 * 0.6)] * 16  # 21 of 35


def test_paper_count_for_224_images():
    assert random_patch_mask(2, 7, 7, 0.6).flatten(1).sum(dim=1).tolist() == [29, 29]


def test_reproducible_from_generator_and_independent_per_sample():
    first = random_patch_mask(8, 4, 4, 0.5, generator=torch.Generator().manual_seed(3))
    again = random_patch_mask(8, 4, 4, 0.5, generator=torch.Generator().manual_seed(3))
    other = random_patch_mask(8, 4, 4, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(row.tolist()) for row in first.flatten(1)}) > 1


def test_every_patch_equally_likely():
    mask = random_patch_mask(20000, 3, 3, 0.6, generator=torch.Generator().manual_seed(0))
    frequency = mask.float().mean(dim=0)  # each sample hides round(5.4) = 5 of 9
    assert torch.allclose(frequency, torch.full((3, 3), 5 / 9), atol=0.015)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_open_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_mask(2, 4, 4, ratio)


def test_size_not_multiple_of_patch_is_refused():
    assert patch_grid(64, 96, 32) == (2, 3)
    with pytest.raises(ValueError, match="not a multiple of the encoder.s total stride 32"):
        patch_grid(70, 64, 32)


def test_upsample_mask_blocks():
    mask = torch.tensor([[[True, False]]])
    assert upsample_mask(mask, 2).tolist() == [[[True, True, False, False], [True, True, False, False]]]


def test_hidden_count_is_the_official_complement_of_the_visible_count():
    """Official SparK keeps round(L * (1 - r)) patches; at a .5 tie that differs from round(L * r)."""
    assert hidden_patch_count(49, 0.6) == 29
    assert hidden_patch_count(5, 0.5) == 3  # keeps round(2.5) = 2; round(5 * 0.5) would hide only 2
    assert random_patch_mask(4, 1, 5, 0.5).flatten(1).sum(dim=1).tolist() == [3] * 4


def test_same_generator_gives_the_official_mask():
    """Official draw: the first round(L * (1 - r)) of an argsort of uniform noise are the visible patches."""
    batch, grid_h, grid_w, ratio = 6, 7, 7, 0.6
    noise = torch.rand(batch, grid_h * grid_w, generator=torch.Generator().manual_seed(5))
    keep = round(grid_h * grid_w * (1 - ratio))
    active = torch.zeros(batch, grid_h * grid_w, dtype=torch.bool).scatter_(1, noise.argsort(dim=1)[:, :keep], True)
    mask = random_patch_mask(batch, grid_h, grid_w, ratio, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mask, ~active.view(batch, grid_h, grid_w))


def _trainer_check(image_size: int, ratio: float) -> None:
    from omegaconf import OmegaConf

    pretraining_inputs(OmegaConf.create({"image_size": image_size}), 2, 32, ratio)


@pytest.mark.parametrize("ratio", [0.05, 0.5, 0.6, 0.9, 0.9444444444444445])
@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_config_check_and_model_refuse_the_same_settings(image_size, ratio):
    """The trainer's config check is the model's: L patches hide L - round(L * (1 - r)) (at 3x3 and
    r = 0.9444444444444445 that is all 9, where round(L * r) = 8 would let the config through)."""
    num_patches = (image_size // 32) ** 2
    hidden = num_patches - round(num_patches * (1 - ratio))
    if 0 < hidden < num_patches:
        assert check_mask_geometry(image_size, image_size, 32, ratio) == (image_size // 32,) * 2
        _trainer_check(image_size, ratio)
        assert random_patch_mask(2, image_size // 32, image_size // 32, ratio).sum().item() == 2 * hidden
        return
    with pytest.raises(ValueError, match=f"hides {hidden} of {num_patches}"):
        check_mask_geometry(image_size, image_size, 32, ratio)
    with pytest.raises(ValueError, match=f"data.image_size={image_size}.*hides {hidden} of {num_patches}"):
        _trainer_check(image_size, ratio)
