"""Per-iteration schedules: linear warmup then cosine for the lr, cosine ramp for weight decay."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CosineSchedule", "cosine"]


def cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class CosineSchedule:
    """lr: 0 -> ``peak_lr`` linearly over ``warmup_steps``, then cosine to ``peak_lr * min_lr_ratio``.

    Weight decay follows a cosine from ``weight_decay`` to ``weight_decay_end`` over the whole run
    (SparK: 0.04 -> 0.2). Steps are optimizer steps; the position is just the step counter, so a
    resumed run continues the schedule exactly.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least one step (got total_steps={self.total_steps})")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]")

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        return cosine(self.peak_lr, self.peak_lr * self.min_lr_ratio, (step - self.warmup_steps) / decay_steps)

    def wd(self, step: int) -> float:
        return cosine(self.weight_decay, self.weight_decay_end, step / max(self.total_steps - 1, 1))
