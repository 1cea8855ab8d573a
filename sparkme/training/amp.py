"""Mixed precision of a training step: bf16 autocast where ``train.amp`` applies."""

from __future__ import annotations

import torch

__all__ = ["AMP_DEVICE_TYPES", "step_autocast"]

# Device types where ``train.amp`` turns bf16 autocast on. The CPU is left out: bf16 is slower
# than fp32 there without AMX; the CPU tests add it to run the GPU's mixed-precision step.
AMP_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def step_autocast(device: torch.device, amp: bool) -> torch.autocast:
    """The autocast context of one training step on ``device``: bf16 with ``amp`` on an AMP device type."""
    enabled = bool(amp) and device.type in AMP_DEVICE_TYPES
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
