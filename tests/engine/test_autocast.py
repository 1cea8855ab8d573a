"""bf16 autocast: the gather backend computes in bf16 and is as accurate as masked-dense in bf16.

There is no exact bf16 answer to compare with, so the yardstick is the independent masked-dense
reference run twice: in fp32 (the truth) and under the same autocast (what SparK's official
emulation gets in bf16). The sparse path's error against the fp32 truth must be of the same size
as the masked-dense bf16 error, and its features must really be bf16 (not a silent fp32 run).
The stock MinkowskiEngine backend takes fp32 only: under autocast the encoder runs it in fp32.
"""

from __future__ import annotations

import pytest
import torch
from engine_reference import (
    USER_STAGES,
    make_model,
    masked_reference,
    random_visible,
    reference_features,
    to_pixels,
)

import sparkme

SIZES = {"user_cnn": (32, 48)}


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def _run(name: str, device: str, backend: str):
    """(sparse under autocast, masked-dense under autocast, masked-dense fp32): features + input grads."""
    model = make_model(name).to(device).train()
    encoder = sparkme.sparsify(model, stages=USER_STAGES if name == "user_cnn" else None, backend=backend)
    height, width = SIZES.get(name, (64, 96))
    patch = encoder.downsample_ratio
    visible = random_visible(2, (height // patch, width // patch), 0.6, seed=6).to(device)
    pixels = to_pixels(visible, (height, width))
    names = [s.name for s in encoder.stages]
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3)).to(device)
    generator = torch.Generator().manual_seed(5)
    results = []
    for kind, autocast in (("sparse", True), ("reference", True), ("reference", False)):
        x = images.clone().requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            if kind == "sparse":
                features = encoder(x, visible)
            else:
                features = reference_features(masked_reference(model, pixels), names, x, pixels)
        if not results:
            weights = [torch.randn(f.shape, generator=generator).to(device) for f in features]
        sum((f.float() * w).sum() for f, w in zip(features, weights)).backward()
        results.append((features, x.grad))
    return results, pixels, encoder


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "user_cnn"])
def test_gather_bf16_as_accurate_as_masked_dense_bf16(name: str, device: str = "cpu") -> None:
    (sparse, ref_bf16, ref_fp32), pixels, encoder = _run(name, device, "gather")
    dtypes = {f.dtype for f in sparse[0]}
    if name != "convnext_atto":  # ConvNeXt stages end in LayerNorm, which autocast runs in fp32
        assert torch.bfloat16 in dtypes, f"no stage computed in bf16: {dtypes}"
    for i, (a, b, truth) in enumerate(zip(sparse[0], ref_bf16[0], ref_fp32[0])):
        stride = encoder.feature_strides[i]
        hidden = ~pixels[:, :, ::stride, ::stride]
        assert (a * hidden).abs().max() == 0, f"stage {i}: non-zero feature at a hidden site"
        sparse_err, dense_err = _rel(a, truth), _rel(b, truth)
        assert sparse_err <= 2 * dense_err + 1e-2, (
            f"stage {i}: sparse bf16 {sparse_err:.3g} vs dense bf16 {dense_err:.3g}"
        )
    sparse_err, dense_err = _rel(sparse[1], ref_fp32[1]), _rel(ref_bf16[1], ref_fp32[1])
    assert sparse_err <= 2 * dense_err + 1e-2, f"input grad: sparse bf16 {sparse_err:.3g} vs dense bf16 {dense_err:.3g}"


def test_minkowski_backend_ignores_autocast() -> None:
    (sparse, _, ref_fp32), _, _ = _run("user_cnn", "cpu", "minkowski")
    for a, truth in zip(sparse[0], ref_fp32[0]):
        assert a.dtype == torch.float32
        assert _rel(a, truth) < 1e-4
    assert _rel(sparse[1], ref_fp32[1]) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_gather_bf16_cuda(name: str) -> None:
    test_gather_bf16_as_accurate_as_masked_dense_bf16(name, device="cuda")
