"""The sparse engine against the independent masked-dense reference (conftest.py): forward and backward."""

from __future__ import annotations

import pytest
import torch
from engine_reference import (
    USER_STAGES,
    assert_rel,
    border_visible,
    make_model,
    masked_reference,
    random_visible,
    reference_features,
    to_pixels,
)

import sparkme

SIZES = {"user_cnn": (32, 48), "user_cnn_syncbn": (32, 48)}  # patch 8; timm models: patch 32
DEFAULT_SIZE = (64, 96)


def _stages(name: str) -> list[str] | None:
    return USER_STAGES if name.startswith("user_cnn") else None


def compare(
    name: str,
    visible_fn,
    train: bool,
    dtype=torch.float64,
    size=None,
    tol: float = 1e-4,
    device: str = "cpu",
    backward: bool = True,
    drop_path_rate: float = 0.0,
):
    """Run engine and reference on the same weights / images / mask; check features, grads, BN stats."""
    model = make_model(name, drop_path_rate).to(device=device, dtype=dtype)
    model.train(train)
    encoder = sparkme.sparsify(model, stages=_stages(name))
    height, width = size or SIZES.get(name, DEFAULT_SIZE)
    patch = encoder.downsample_ratio
    visible = visible_fn((height // patch, width // patch)).to(device)
    pixels = to_pixels(visible, (height, width))
    reference = masked_reference(model, pixels)

    generator = torch.Generator().manual_seed(3)
    images = torch.randn(visible.shape[0], 3, height, width, generator=generator, dtype=dtype).to(device)
    images_sparse = images.clone().requires_grad_(backward)
    images_ref = images.clone().requires_grad_(backward)

    torch.manual_seed(42)  # the same drop-path draws in both
    sparse = encoder(images_sparse, visible)
    torch.manual_seed(42)
    dense = reference_features(reference, [s.name for s in encoder.stages], images_ref, pixels)
    for i, (a, b) in enumerate(zip(sparse, dense)):
        assert_rel(a, b, tol, f"{name} stage {i} features")
        hidden = ~to_pixels(visible, (height, width))[
            :, :, :: encoder.feature_strides[i], :: encoder.feature_strides[i]
        ]
        assert (a * hidden).abs().max() == 0, "non-zero feature at a hidden site"
    if train:
        for (key, a), (_, b) in zip(encoder.model.named_buffers(), reference.named_buffers()):
            if a.is_floating_point():
                assert_rel(a, b, tol, f"{name} buffer {key}")
            else:
                assert torch.equal(a, b), key
    if not backward:
        return
    weights = [torch.randn(f.shape, generator=generator, dtype=dtype).to(device) for f in dense]
    sum(((f * w).sum() for f, w in zip(sparse, weights))).backward()
    sum(((f * w).sum() for f, w in zip(dense, weights))).backward()
    assert_rel(images_sparse.grad, images_ref.grad, tol, f"{name} input grad")
    checked = 0
    grad_scale = max(p.grad.abs().max().item() for p in reference.parameters() if p.grad is not None)
    for (key, a), (_, b) in zip(encoder.model.named_parameters(), reference.named_parameters()):
        if b.grad is None:
            assert a.grad is None or a.grad.abs().max() == 0, key
            continue
        assert a.grad is not None, f"{key} has no gradient in the sparse encoder"
        # grads that are zero in exact arithmetic (conv bias before train-mode BN) are pure rounding noise
        floor = (1e-3 if dtype == torch.float64 else 5e-2) * grad_scale
        assert_rel(a.grad, b.grad, tol, f"{name} grad {key}", floor=floor)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "user_cnn"])
def test_matches_masked_dense(name: str):
    """The core check, fast enough for every run: train mode, ratio 0.6, forward and backward."""
    compare(name, lambda grid: random_visible(2, grid, 0.6, seed=6), train=True)


@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.9])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_user_cnn_sweep(ratio: float, train: bool):
    compare("user_cnn", lambda grid: random_visible(2, grid, ratio, seed=int(ratio * 10)), train)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.9])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_sweep(name: str, ratio: float, train: bool):
    compare(name, lambda grid: random_visible(2, grid, ratio, seed=int(ratio * 10)), train)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_border_rows_and_columns_hidden_timm(name: str):
    compare(name, lambda grid: border_visible(2, grid), train=True)


@pytest.mark.parametrize("name", ["user_cnn"])
def test_border_rows_and_columns_hidden(name: str):
    compare(name, lambda grid: border_visible(2, grid), train=True)


@pytest.mark.parametrize(
    "name,size",
    [
        pytest.param("resnet18", (96, 128), marks=pytest.mark.slow),
        pytest.param("convnext_atto", (128, 96), marks=pytest.mark.slow),
        ("user_cnn", (40, 24)),
    ],
)
def test_non_square_inputs(name: str, size):
    compare(name, lambda grid: random_visible(2, grid, 0.6, seed=5), train=True, size=size)


@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.slow), "user_cnn"])
def test_float32(name: str):
    compare(name, lambda grid: random_visible(2, grid, 0.6, seed=7), train=True, dtype=torch.float32, tol=1e-3)


def test_sync_batchnorm_single_process():
    compare("user_cnn_syncbn", lambda grid: random_visible(2, grid, 0.6, seed=8), train=True)
    source = make_model("user_cnn_syncbn")
    encoder = sparkme.sparsify(source, stages=USER_STAGES)
    assert isinstance(encoder.model.stem[1], torch.nn.SyncBatchNorm)
    assert type(source.stem[1]) is torch.nn.SyncBatchNorm  # the source keeps its class
    assert list(encoder.dense_state_dict()) == list(source.state_dict())


@pytest.mark.slow
def test_drop_path_is_per_sample():
    """ConvNeXt with drop-path 0.5 in train mode: both sides draw the same per-sample keep masks."""
    compare("convnext_atto", lambda grid: random_visible(2, grid, 0.4, seed=9), train=True, drop_path_rate=0.5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "resnet50",
        "resnet50d",
        "resnext50_32x4d",
        "seresnet50",
        "convnext_tiny",
        "convnextv2_atto",
        "convnextv2_atto+conv_mlp",  # channels-first GRN
        "regnety_002",
        "efficientnet_b0",
        "mobilenetv3_small_100",
    ],
)
def test_families(name: str):
    compare(name, lambda grid: random_visible(2, grid, 0.6, seed=11), train=True, size=(64, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "user_cnn"])
def test_cuda_matches_masked_dense(name: str):
    compare(
        name,
        lambda grid: random_visible(2, grid, 0.6, seed=13),
        train=True,
        dtype=torch.float32,
        tol=1e-3,
        device="cuda",
    )
