"""Patch masks: exact count, uniform, reproducible, clear errors."""

from __future__ import annotations

import pytest
import torch

from sparkme.method import random_patch_mask
from sparkme.method.masking import patch_grid, upsample_mask


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
    with pytest.raises(ValueError, match="multiple of the patch side 32"):
        patch_grid(70, 64, 32)


def test_upsample_mask_blocks():
    mask = torch.tensor([[[True, False]]])
    assert upsample_mask(mask, 2).tolist() == [[[True, True, False, False], [True, True, False, False]]]
