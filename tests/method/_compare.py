"""Helpers for the method tests: compare two training steps' outputs and gradients in float64."""

from __future__ import annotations

import torch

RTOL = 1e-10  # float64 round-off of reordered sums, far below any real difference


def assert_same_step(reference: dict[str, torch.Tensor], result: dict[str, torch.Tensor]) -> None:
    """Every entry of ``result`` equals ``reference`` to ``RTOL``; gradients are measured in units of the
    largest gradient (one that is zero in exact arithmetic, a conv bias before BatchNorm, is round-off)."""
    assert result.keys() == reference.keys() and any(k.startswith("grad densify.mask_tokens") for k in result)
    floor = 1e-3 * max(float(v.abs().max()) for k, v in reference.items() if k.startswith("grad"))
    for key, expected in reference.items():
        scale = max(float(expected.abs().max()), floor if key.startswith("grad") else 1e-300)
        error = float((result[key] - expected).abs().max()) / scale
        assert error <= RTOL, f"{key}: relative error {error:.1e}"
