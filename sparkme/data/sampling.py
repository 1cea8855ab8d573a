"""Resumable data order and augmentation randomness.

The sampler yields ``(index, sample_seed)`` pairs: the order is a pure function of
``(seed, epoch)`` (``DistributedSampler`` semantics, one shard per rank) and each
sample's augmentation draws from its own seed, so a run resumed in the middle of an
epoch sees exactly the images and crops the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ResumableSampler", "SeededTransformDataset", "sample_seed"]

_MASK63 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, fixed by (run seed, epoch, dataset index)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index * 998_244_353) & _MASK63


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start mid-epoch and tags each index with its augmentation seed."""

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self._start = 0

    def skip(self, num_samples: int) -> None:
        """Skip this rank's first ``num_samples`` samples of the next epoch iterated (resume)."""
        self._start = num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self._start :]
        self._start = 0
        return iter([(index, sample_seed(self.seed, self.epoch, index)) for index in indices])


class SeededTransformDataset(Dataset):
    """Wraps a dataset of PIL images; applies ``transform`` under the sample's own torch seed."""

    def __init__(self, base: Any, transform: Callable[[Any], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        image, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label
