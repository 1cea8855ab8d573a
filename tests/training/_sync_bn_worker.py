"""One rank of the SyncBatchNorm test, and the pieces the test's single-process reference shares.

Run as ``torchrun --standalone --nproc_per_node 2 _sync_bn_worker.py OUT``: each rank builds the
float64 SparK model with every BatchNorm synchronised, wraps it in DDP with
``find_unused_parameters=False``, runs its own shard of one fixed batch (ranks get different
sample counts) and saves the decoder output, input and parameter gradients and the BatchNorm
buffers to ``OUT/rank<r>.pt``. A second step checks that DDP found no unused parameter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

SHARDS = (2, 3)  # samples per rank: unequal, so a mean of per-rank means would be wrong
SIZE = 32
PATCH = 8


class TinyCNN(nn.Module):
    """A 1x1-conv stem (its BN input at visible pixels equals the dense conv's), two strided stages, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.stage2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))  # never run by SparK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))))


def build(sync_bn: bool) -> nn.Module:
    """The float64 SparK model the ranks and the reference share (same seed, same weights)."""
    from sparkme.training.build import spark_from_dense

    torch.manual_seed(0)
    dense = TinyCNN().double()
    model = spark_from_dense(
        dense, {"decoder_width": 16, "mask_ratio": 0.5}, stages=["stage1", "stage2"], sync_bn=sync_bn
    )
    return model.double().train()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole batch: images, mask (True = hidden patch) and the probe weighting the decoder output."""
    generator = torch.Generator().manual_seed(1)
    count, grid = sum(SHARDS), SIZE // PATCH
    images = torch.randn(count, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    order = torch.rand(count, grid * grid, generator=generator).argsort(dim=1)
    mask = (order < grid * grid // 2).reshape(count, grid, grid)
    probe = torch.randn(count, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    return images, mask, probe


def shard(rank: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    start = sum(SHARDS[:rank])
    return [t[start : start + SHARDS[rank]] for t in tensors]


def main(out: Path) -> None:
    import torch.distributed as dist

    from sparkme.engine.layers.sync_bn import SparseSyncBatchNorm

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == len(SHARDS)
    model = build(sync_bn=True)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    images, mask, probe = shard(rank, *batch())
    images.requires_grad_(True)
    _, pred, _ = ddp(images, mask=mask)
    (pred * probe).sum().backward()
    result = {
        "pred": pred.detach(),
        "images_grad": images.grad,
        "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
        "trainable": sorted(k for k, p in model.named_parameters() if p.requires_grad),
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "sync_bn": sorted(k for k, m in model.named_modules() if isinstance(m, SparseSyncBatchNorm)),
    }
    # A second step: with find_unused_parameters=False DDP raises here if a parameter got no gradient.
    model.zero_grad(set_to_none=True)
    _, pred, _ = ddp(images.detach(), mask=mask)
    (pred * probe).sum().backward()
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
