"""The sparse engine on volumes (Conv3d CNNs) against the independent 3-D masked-dense reference, forward
and backward, train and eval, on every conv backend; dense equality when nothing is hidden; refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_compare import BACKENDS, Outcome, _check_as_accurate, _check_exact, _compare_outcomes, _finish, run_sparse
from engine_reference3d import (
    SIZE3D,
    STAGES3D,
    border_visible3d,
    make_model3d,
    masked_reference3d,
    random_visible3d,
    to_voxels,
)
from torch import nn

import sparkme
from sparkme.engine import UnsupportedLayerError

backends = pytest.mark.parametrize("backend", BACKENDS)


def _reference(model, volumes, voxels, weights, backward: bool) -> Outcome:
    reference = masked_reference3d(model, voxels)
    volumes = volumes.clone().requires_grad_(backward)
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        reference.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, o))
        for name in STAGES3D
    ]
    reference.stage4(reference.stage3(reference.stage2(reference.stage1(reference.stem(volumes * voxels)))))
    for handle in handles:
        handle.remove()
    return _finish(reference, [outputs[name] for name in STAGES3D], volumes, weights, backward)


def compare3d(visible_fn, train: bool, backend: str, dtype=torch.float64, backward: bool = True) -> None:
    model = make_model3d().to(dtype).train(train)
    encoder = sparkme.sparsify(model, stages=STAGES3D, backend=backend)
    assert (encoder.spatial_dims, encoder.in_channels, encoder.feature_strides) == (3, 1, [2, 4, 8, 16])
    patch = encoder.downsample_ratio
    visible = visible_fn(tuple(side // patch for side in SIZE3D))
    voxels = to_voxels(visible, SIZE3D)
    generator = torch.Generator().manual_seed(3)
    volumes = torch.randn(visible.shape[0], 1, *SIZE3D, generator=generator, dtype=dtype)
    weights = [
        torch.randn(visible.shape[0], c, *(side // s for side in SIZE3D), generator=generator, dtype=dtype)
        for s, c in zip(encoder.feature_strides, encoder.feature_channels)
    ]
    sparse = run_sparse(encoder, volumes, visible, weights, backward)
    for stride, feature in zip(encoder.feature_strides, sparse.features):
        hidden = ~voxels[:, :, ::stride, ::stride, ::stride]
        assert (feature * hidden).abs().max() == 0, f"stride {stride}: non-zero feature at a hidden voxel"
    same = _reference(model, volumes, voxels, weights, backward)
    if dtype == torch.float64:
        truth, check = same, _check_exact
    else:
        wide = copy.deepcopy(model).double()
        truth = _reference(wide, volumes.double(), voxels, [w.double() for w in weights], backward)
        check = _check_as_accurate
    _compare_outcomes("user_cnn3d", sparse, same, truth, check, train, backward)


@backends
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_masked_dense_3d(train: bool, backend: str):
    compare3d(lambda grid: random_visible3d(2, grid, 0.6, seed=6), train, backend)


@backends
def test_border_slabs_hidden_3d(backend: str):
    compare3d(lambda grid: border_visible3d(2, grid), True, backend)


@backends
def test_float32_3d(backend: str):
    """No tolerance from one CPU: as accurate as the masked-dense reference in float32."""
    compare3d(lambda grid: random_visible3d(2, grid, 0.6, seed=7), True, backend, dtype=torch.float32)


@backends
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fully_visible_volume_is_the_dense_network(train: bool, backend: str):
    model = make_model3d().double().train(train)
    dense = copy.deepcopy(model)
    encoder = sparkme.sparsify(model, stages=STAGES3D, backend=backend)
    volumes = torch.randn(2, 1, *SIZE3D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    features = encoder(volumes, torch.ones(2, 1, 2, 3, 2, dtype=torch.bool))
    outputs = []
    handles = [dense.get_submodule(n).register_forward_hook(lambda m, i, o: outputs.append(o)) for n in STAGES3D]
    dense(volumes)
    for handle in handles:
        handle.remove()
    for stride, got, want in zip(encoder.feature_strides, features, outputs):
        assert got.shape == want.shape
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= 1e-10, f"stride {stride}: {err:.3g}"


def _backbone3d(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv3d(8, 8, 3, 2, 1), *layers)


@pytest.mark.parametrize(
    "layer,needle",
    [
        (nn.ConvTranspose3d(8, 8, 2, 2), "transposed"),
        (nn.Conv3d(8, 8, 3, 1, padding=2), "not centred"),
        (nn.Conv3d(8, 8, (3, 2, 3), 1, 0), "mixes odd and even"),
        (nn.AvgPool3d(3, 1, 1), "tile"),
        (nn.AdaptiveAvgPool3d(2), "output size 1"),
        (nn.ReplicationPad3d(1), "padding"),
        (nn.Upsample(scale_factor=2), "interpolation"),
    ],
)
def test_refused_at_sparsify_time_3d(layer: nn.Module, needle: str):
    model = nn.Sequential(_backbone3d(), layer, nn.Conv3d(8, 8, 1, 2))
    with pytest.raises(UnsupportedLayerError) as info:
        sparkme.sparsify(model, stages=["0", "2"])
    message = str(info.value)
    assert "1 (" + type(layer).__name__ + ")" in message and needle in message, message


def test_a_2d_layer_on_a_volume_map_is_refused_naming_the_module():
    encoder = sparkme.sparsify(nn.Sequential(nn.Conv3d(1, 4, 3, 4, 1), nn.ReLU()), stages=["1"])
    encoder.model[1] = nn.MaxPool2d(1)
    with pytest.raises(UnsupportedLayerError, match=r"max_pool2d on a 3-d sparse map.*1 \(MaxPool2d\)"):
        encoder(torch.randn(1, 1, 8, 8, 8), torch.ones(1, 1, 2, 2, 2, dtype=torch.bool))


def test_wrong_input_rank_and_size_are_clear_errors():
    encoder = sparkme.sparsify(nn.Sequential(nn.Conv3d(1, 4, 3, 4, 1), nn.ReLU()), stages=["1"])
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        encoder(torch.randn(1, 1, 8, 8), torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="not a multiple of the encoder's downsample ratio 4"):
        encoder(torch.randn(1, 1, 8, 8, 10), torch.ones(1, 1, 8, 8, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="cubic patches"):
        encoder(torch.randn(1, 1, 8, 8, 8), torch.ones(1, 1, 2, 2, 4, dtype=torch.bool))


def test_weights_round_trip_bit_for_bit_3d():
    model = make_model3d()
    encoder = sparkme.sparsify(model, stages=STAGES3D)
    state = encoder.dense_state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    fresh = make_model3d()
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
