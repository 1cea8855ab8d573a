"""The sparse engine against the independent masked-dense reference, forward and backward, on every
conv backend (engine_compare.py holds the comparison and its tolerances)."""

from __future__ import annotations

import pytest
import torch
from engine_compare import BACKENDS, compare
from engine_reference import USER_STAGES, border_visible, make_model, random_visible

import sparkme
from sparkme.engine.layers import norm as sparse_norm

backends = pytest.mark.parametrize("backend", BACKENDS)


@backends
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "user_cnn"])
def test_matches_masked_dense(name: str, backend: str):
    """The core check, fast enough for every run: train mode, ratio 0.6, forward and backward."""
    compare(name, lambda grid: random_visible(2, grid, 0.6, seed=6), train=True, backend=backend)


@backends
@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.9])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_user_cnn_sweep(ratio: float, train: bool, backend: str):
    compare("user_cnn", lambda grid: random_visible(2, grid, ratio, seed=int(ratio * 10)), train, backend=backend)


@pytest.mark.slow
@backends
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
@pytest.mark.parametrize("ratio", [0.4, 0.9])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_sweep(name: str, ratio: float, train: bool, backend: str):
    compare(name, lambda grid: random_visible(2, grid, ratio, seed=int(ratio * 10)), train, backend=backend)


@backends
@pytest.mark.parametrize("name", [pytest.param("convnext_atto", marks=pytest.mark.slow), "user_cnn"])
def test_border_rows_and_columns_hidden(name: str, backend: str):
    compare(name, lambda grid: border_visible(2, grid), train=True, backend=backend)


@backends
@pytest.mark.parametrize(
    "name,size",
    [
        pytest.param("resnet18", (96, 128), marks=pytest.mark.slow),
        pytest.param("convnext_atto", (128, 96), marks=pytest.mark.slow),
        ("user_cnn", (40, 24)),
    ],
)
def test_non_square_inputs(name: str, size, backend: str):
    compare(name, lambda grid: random_visible(2, grid, 0.6, seed=5), train=True, size=size, backend=backend)


@backends
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "user_cnn"])
def test_float32(name: str, backend: str):
    """No tolerance from one CPU: as accurate as the masked-dense reference in float32."""
    compare(name, lambda grid: random_visible(2, grid, 0.6, seed=7), train=True, dtype=torch.float32, backend=backend)


def test_float64_tolerance_catches_a_doubled_layernorm_eps(monkeypatch: pytest.MonkeyPatch):
    """The float64 bound is tight enough to see a LayerNorm eps of 2e-6 instead of 1e-6."""
    handler = sparse_norm.layer_norm

    def doubled_eps(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
        return handler(x, normalized_shape, weight, bias, 2 * eps)

    monkeypatch.setitem(sparkme.engine.sparse_map.HANDLERS, torch.nn.functional.layer_norm, doubled_eps)
    with pytest.raises(AssertionError, match="relative error"):
        compare("convnext_atto", lambda grid: random_visible(2, grid, 0.6, seed=6), train=True, backward=False)


@backends
def test_sync_batchnorm_single_process(backend: str):
    compare("user_cnn_syncbn", lambda grid: random_visible(2, grid, 0.6, seed=8), train=True, backend=backend)
    source = make_model("user_cnn_syncbn")
    encoder = sparkme.sparsify(source, stages=USER_STAGES, backend=backend)
    assert isinstance(encoder.model.stem[1], sparkme.engine.layers.sync_bn.SparseSyncBatchNorm)  # DDP takes it on CPU
    assert type(source.stem[1]) is torch.nn.SyncBatchNorm  # the source keeps its class
    assert list(encoder.dense_state_dict()) == list(source.state_dict())


@pytest.mark.slow
@backends
def test_drop_path_is_per_sample(backend: str):
    """ConvNeXt with drop-path 0.5 in train mode: both sides draw the same per-sample keep masks."""
    compare(
        "convnext_atto",
        lambda grid: random_visible(2, grid, 0.4, seed=9),
        train=True,
        drop_path_rate=0.5,
        backend=backend,
    )


@pytest.mark.slow
@backends
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
def test_families(name: str, backend: str):
    compare(name, lambda grid: random_visible(2, grid, 0.6, seed=11), train=True, size=(64, 64), backend=backend)


@pytest.mark.gpu
@backends
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "user_cnn"])
def test_cuda_matches_masked_dense(name: str, backend: str):
    compare(
        name,
        lambda grid: random_visible(2, grid, 0.6, seed=13),
        train=True,
        dtype=torch.float32,
        device="cuda",
        backend=backend,
    )
