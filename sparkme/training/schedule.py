"""Per-iteration schedules: linear warmup then cosine for the lr, cosine ramp for weight decay.

The formulas are official SparK's ``lr_wd_annealing`` (``pretrain/utils/lr_control.py``): the lr
rises linearly from ``warmup_start_ratio x peak`` (0.005) to the peak over the warmup steps, then
follows a half cosine that reaches ``min_lr_ratio x peak`` (0.001) at the last step; weight decay
follows a half cosine from ``weight_decay`` to ``weight_decay_end`` over the whole run.
"""

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
    """lr: ``peak_lr * warmup_start_ratio`` -> ``peak_lr`` linearly, then cosine to ``peak_lr * min_lr_ratio``.

    Step ``s`` of ``total_steps`` (optimizer steps; a resumed run continues exactly): during warmup
    ``lr = peak * (w0 + (1 - w0) * s / warmup_steps)``; after it the cosine progress is
    ``(s - warmup_steps) / (total_steps - 1 - warmup_steps)``, so the peak is hit at the first step
    after warmup and the floor at the last step. Weight decay: cosine from ``weight_decay`` (step 0)
    to ``weight_decay_end`` (last step); SparK uses 0.04 -> 0.2.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.001
    warmup_start_ratio: float = 0.005
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least one step (got total_steps={self.total_steps})")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]")

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            start = self.warmup_start_ratio
            return self.peak_lr * (start + (1.0 - start) * step / self.warmup_steps)
        decay_steps = max(self.total_steps - 1 - self.warmup_steps, 1)
        return cosine(self.peak_lr, self.peak_lr * self.min_lr_ratio, (step - self.warmup_steps) / decay_steps)

    def wd(self, step: int) -> float:
        return cosine(self.weight_decay, self.weight_decay_end, step / max(self.total_steps - 1, 1))
