"""Schedules and optimizer groups of the paper's recipe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparkme.training.optim import apply_schedule, effective_lr, param_groups
from sparkme.training.schedule import CosineSchedule


def test_effective_lr_scales_with_batch() -> None:
    assert effective_lr(2e-4, 4096) == pytest.approx(3.2e-3)
    assert effective_lr(2e-4, 256) == pytest.approx(2e-4)


def _official_lr_wd(peak_lr, wd, wd_end, cur_it, wp_it, max_it):
    """Official SparK ``lr_wd_annealing`` (pretrain/utils/lr_control.py), re-stated."""
    wp_it = round(wp_it)
    if cur_it < wp_it:
        cur_lr = 0.005 * peak_lr + 0.995 * peak_lr * cur_it / wp_it
    else:
        ratio = (cur_it - wp_it) / (max_it - 1 - wp_it)
        cur_lr = 0.001 * peak_lr + 0.999 * peak_lr * (0.5 + 0.5 * math.cos(math.pi * ratio))
    ratio = cur_it / (max_it - 1)
    return cur_lr, wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * ratio))


@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (1600 * 3, 40 * 3), (7, 0)])
def test_schedule_is_the_official_lr_wd_annealing(total, warmup) -> None:
    schedule = CosineSchedule(peak_lr=3.2e-3, total_steps=total, warmup_steps=warmup)
    for step in range(total):
        lr, wd = _official_lr_wd(3.2e-3, 0.04, 0.2, step, warmup, total)
        assert schedule.lr(step) == pytest.approx(lr, rel=1e-12, abs=1e-18)
        assert schedule.wd(step) == pytest.approx(wd, rel=1e-12)
    assert schedule.lr(total - 1) == pytest.approx(3.2e-6)  # ends at 0.001 x peak
    if warmup:
        assert schedule.lr(0) == pytest.approx(1.6e-5) and schedule.lr(warmup) == pytest.approx(3.2e-3)


def test_schedule_ends_are_options() -> None:
    schedule = CosineSchedule(peak_lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.0, warmup_start_ratio=0.0)
    lrs = [schedule.lr(step) for step in range(100)]
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0) and lrs[99] == pytest.approx(0.0, abs=1e-15)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decreasing
    assert schedule.wd(49) < schedule.wd(50)
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineSchedule(peak_lr=1.0, total_steps=5, warmup_steps=6)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.mask_token = nn.Parameter(torch.zeros(1, 4, 1, 1))


def test_no_decay_on_biases_norms_and_mask_embeddings() -> None:
    net = _Net()
    decay, plain = param_groups(net)
    names = {id(p): n for n, p in net.named_parameters()}
    assert [names[id(p)] for p in decay["params"]] == ["conv.weight"]
    assert {names[id(p)] for p in plain["params"]} == {"conv.bias", "norm.weight", "norm.bias", "mask_token"}
    optimizer = torch.optim.SGD([decay, plain], lr=0.0)
    apply_schedule(optimizer, lr=0.5, weight_decay=0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 0.5 for g in optimizer.param_groups)


def test_timm_lamb_builds_from_the_config() -> None:
    from _helpers import compose
    from hydra.utils import instantiate

    from sparkme.training.optim import build_optimizer

    cfg = compose()
    optimizer = build_optimizer(_Net(), instantiate(cfg.optim.optimizer), lr=1e-3)
    assert type(optimizer).__name__ == "Lamb" and optimizer.defaults["betas"] == (0.9, 0.95)
