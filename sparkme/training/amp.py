"""Mixed precision of a training step: bf16 autocast where ``train.amp`` / ``train.cpu_amp`` apply."""

from __future__ import annotations

import warnings

import torch

__all__ = ["AMP_DEVICE_TYPES", "cpu_has_native_bf16", "step_autocast"]

# Device types where ``train.amp`` turns bf16 autocast on. The CPU has its own switch,
# ``train.cpu_amp`` (off by default: the official SparK computes in fp32, and bf16 is emulated,
# hence slower, on CPUs without AVX512-BF16 or AMX).
AMP_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles), where bf16 pays."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def step_autocast(device: torch.device, amp: bool, cpu_amp: bool = False) -> torch.autocast:
    """The autocast context of one training step on ``device``: bf16 with ``amp`` on an AMP device
    type, and on the CPU with ``cpu_amp``."""
    on_cpu = bool(cpu_amp) and device.type == "cpu"
    if on_cpu and not cpu_has_native_bf16():  # shown once: Python's default warning filter
        warnings.warn(
            "train.cpu_amp=true on a CPU without native bf16 (AVX512-BF16 or AMX): bf16 is emulated and slower "
            "than fp32 here; set train.cpu_amp=false",
            stacklevel=2,
        )
    enabled = (bool(amp) and device.type in AMP_DEVICE_TYPES) or on_cpu
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
