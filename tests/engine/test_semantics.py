"""Sparse semantics: a fully visible image is the dense model, hidden pixels never leak, sites come from the mask."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_compare import BACKENDS, F64_TOL
from engine_reference import USER_STAGES, assert_rel, make_model, random_visible, to_pixels

import sparkme
from sparkme.engine import visible_to_sites

CASES = {"resnet18": (None, (64, 96)), "convnext_atto": (None, (64, 96)), "user_cnn": (USER_STAGES, (32, 48))}


def dense_features(model, stage_names, images):
    """The plain dense model's stage outputs (no mask anywhere)."""
    outputs = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
        for n in stage_names
    ]
    try:
        getattr(model, "forward_features", model)(images)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[n] for n in stage_names]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("train", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eval", "train"])
def test_ratio_zero_is_the_dense_model(name: str, train: bool, backend: str):
    stages, (height, width) = CASES[name]
    model = make_model(name).double().train(train)
    encoder = sparkme.sparsify(model, stages=stages, backend=backend)
    patch = encoder.downsample_ratio
    images = torch.randn(2, 3, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    visible = torch.ones(2, 1, height // patch, width // patch, dtype=torch.bool)
    sparse = encoder(images, visible)
    dense = dense_features(copy.deepcopy(model), [s.name for s in encoder.stages], images)
    for i, (a, b) in enumerate(zip(sparse, dense)):
        assert_rel(a, b, F64_TOL, f"{name} stage {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_hidden_pixels_do_not_leak(name: str, backend: str):
    """float64 because ME's threaded CPU kernels are not bitwise deterministic; a leak of hidden pixels
    scaled by 100 would show at O(1), far above the 1e-10 allowed here."""
    stages, (height, width) = CASES[name]
    model = make_model(name).double().train()
    encoder = sparkme.sparsify(model, stages=stages, backend=backend)
    patch = encoder.downsample_ratio
    visible = random_visible(2, (height // patch, width // patch), 0.6, seed=1)
    pixels = to_pixels(visible, (height, width))
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 100
    first, second = encoder(images, visible), encoder(torch.where(pixels, images, noise), visible)
    for i, (a, b) in enumerate(zip(first, second)):
        assert_rel(b, a, 1e-10, f"{name} stage {i}")


def test_sites_come_from_the_mask_not_the_pixels():
    """A visible black image still has every visible site active, at every scale."""
    encoder = sparkme.sparsify(make_model("user_cnn"), stages=USER_STAGES)
    visible = random_visible(2, (4, 6), 0.5, seed=2)
    outputs = encoder.forward_sparse(torch.zeros(2, 3, 32, 48), visible)
    for out, stride in zip(outputs, encoder.feature_strides):
        cells = (8 // stride) ** 2
        assert out.F.shape[0] == int(visible.sum()) * cells
        coords = out.C.long()
        assert torch.equal(
            visible[coords[:, 0], 0, coords[:, 1] // 8, coords[:, 2] // 8], torch.ones(len(coords), dtype=torch.bool)
        )
    sites = visible_to_sites(visible, (32, 48))
    assert sites.shape == (int(visible.sum()) * 64, 3)


def test_pixel_resolution_mask_is_accepted():
    encoder = sparkme.sparsify(make_model("user_cnn").double(), stages=USER_STAGES).eval()
    visible = random_visible(2, (4, 6), 0.5, seed=3)
    images = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    for a, b in zip(encoder(images, visible), encoder(images, to_pixels(visible, (32, 48)))):
        assert_rel(b, a, 1e-10)


def test_bad_inputs_are_refused_clearly():
    encoder = sparkme.sparsify(make_model("user_cnn"), stages=USER_STAGES)
    with pytest.raises(ValueError, match="multiple of the encoder's downsample ratio 8"):
        encoder(torch.randn(1, 3, 30, 48), torch.ones(1, 1, 30, 48, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        encoder(torch.randn(1, 3, 32, 48), torch.ones(1, 1, 4, 6))
    with pytest.raises(ValueError, match="hides every pixel"):
        encoder(torch.randn(1, 3, 32, 48), torch.zeros(1, 1, 4, 6, dtype=torch.bool))
