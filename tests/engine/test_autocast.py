"""bf16 autocast: the gather backend computes in bf16 and is as accurate as masked-dense in bf16.

There is no exact bf16 answer to compare with, so the yardstick is the independent masked-dense
reference run in float64 (the truth) and under the same autocast (what SparK's official emulation
gets in bf16). The sparse path's error against the truth may be at most twice the masked-dense
bf16 error (``assert_as_accurate`` in engine_compare.py), and its features must really be bf16
(not a silent fp32 run).
The stock MinkowskiEngine backend takes fp32 only: under autocast the encoder runs it in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from engine_compare import assert_as_accurate
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


def _run(name: str, device: str, backend: str):
    """Features and input grads of: the sparse encoder under bf16 autocast, the masked-dense reference
    under the same autocast, in fp32, and in float64 (the truth), all on the same fp32 weights."""
    model = make_model(name).to(device).train()
    encoder = sparkme.sparsify(model, stages=USER_STAGES if name == "user_cnn" else None, backend=backend)
    height, width = SIZES.get(name, (64, 96))
    patch = encoder.downsample_ratio
    visible = random_visible(2, (height // patch, width // patch), 0.6, seed=6).to(device)
    pixels = to_pixels(visible, (height, width))
    names = [s.name for s in encoder.stages]
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3)).to(device)
    generator = torch.Generator().manual_seed(5)
    results, weights = {}, None
    runs = (("sparse", True, torch.float32), ("bf16", True, torch.float32), ("fp32", False, torch.float32))
    for kind, autocast, dtype in (*runs, ("truth", False, torch.float64)):
        x = images.to(dtype, copy=True).requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            if kind == "sparse":
                features = encoder(x, visible)
            else:
                reference = masked_reference(copy.deepcopy(model).to(dtype), pixels)
                features = reference_features(reference, names, x, pixels)
        if weights is None:
            weights = [torch.randn(f.shape, generator=generator).to(device) for f in features]
        sum((f.to(dtype) * w.to(dtype)).sum() for f, w in zip(features, weights)).backward()
        results[kind] = (features, x.grad)
    return results, pixels, encoder


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "user_cnn"])
def test_gather_bf16_as_accurate_as_masked_dense_bf16(name: str, device: str = "cpu") -> None:
    runs, pixels, encoder = _run(name, device, "gather")
    sparse, ref_bf16, truth = runs["sparse"], runs["bf16"], runs["truth"]
    dtypes = {f.dtype for f in sparse[0]}
    if name != "convnext_atto":  # ConvNeXt stages end in LayerNorm, which autocast runs in fp32
        assert torch.bfloat16 in dtypes, f"no stage computed in bf16: {dtypes}"
    for i, (a, b, t) in enumerate(zip(sparse[0], ref_bf16[0], truth[0])):
        stride = encoder.feature_strides[i]
        hidden = ~pixels[:, :, ::stride, ::stride]
        assert (a * hidden).abs().max() == 0, f"stage {i}: non-zero feature at a hidden site"
        assert_as_accurate(a, b, t, f"stage {i} features")
    assert_as_accurate(sparse[1], ref_bf16[1], truth[1], "input grad")


def test_minkowski_backend_ignores_autocast() -> None:
    """Stock ME kernels take fp32: under autocast the encoder runs them in fp32, as accurate as fp32."""
    runs, _, _ = _run("user_cnn", "cpu", "minkowski")
    sparse, ref_fp32, truth = runs["sparse"], runs["fp32"], runs["truth"]
    for i, (a, b, t) in enumerate(zip(sparse[0], ref_fp32[0], truth[0])):
        assert a.dtype == torch.float32
        assert_as_accurate(a, b, t, f"stage {i} features")
    assert_as_accurate(sparse[1], ref_fp32[1], truth[1], "input grad")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_gather_bf16_cuda(name: str) -> None:
    test_gather_bf16_as_accurate_as_masked_dense_bf16(name, device="cuda")
