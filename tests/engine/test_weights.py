"""Weights: no sharing with the source, bitwise round trips, trained sparse weights reproduce densely."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_reference import USER_STAGES, assert_rel, make_model, random_visible
from test_semantics import dense_features

import sparkme

_slow = pytest.mark.slow


def test_round_trip_is_bitwise_and_shares_nothing(name: str = "resnet18"):
    """The encoder keeps the dense model's own modules, so this holds by design; one cheap check
    that sparsify copies (shares no storage) and that export and import are exact."""
    model = make_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    encoder = sparkme.sparsify(model, stages=USER_STAGES if name == "user_cnn" else None)
    source_ptrs = {t.data_ptr() for t in model.state_dict().values()}
    assert not source_ptrs & {t.data_ptr() for t in encoder.model.state_dict().values()}
    exported = encoder.dense_state_dict()
    assert list(exported) == list(model.state_dict())
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in fresh.state_dict().values():
            tensor.zero_()
    fresh.load_state_dict(exported)
    for key, value in fresh.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    encoder.load_dense_state_dict(fresh.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(encoder.dense_state_dict().values(), before.values()))


@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=_slow), "convnext_atto", "user_cnn"])
def test_trained_sparse_weights_reproduce_densely(name: str):
    stages = USER_STAGES if name == "user_cnn" else None
    size = (32, 48) if name == "user_cnn" else (64, 64)
    model = make_model(name).double()
    encoder = sparkme.sparsify(model, stages=stages).train()
    patch = encoder.downsample_ratio
    grid = (size[0] // patch, size[1] // patch)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        images = torch.randn(2, 3, *size, dtype=torch.float64, generator=generator)
        loss = sum(f.square().mean() for f in encoder(images, random_visible(2, grid, 0.5, seed=step)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(
        encoder.dense_state_dict()[next(iter(model.state_dict()))], model.state_dict()[next(iter(model.state_dict()))]
    )
    dense = copy.deepcopy(model)
    dense.load_state_dict(encoder.dense_state_dict())
    encoder.eval()
    dense.eval()
    images = torch.randn(2, 3, *size, dtype=torch.float64, generator=generator)
    sparse_out = encoder(images, torch.ones(2, 1, *grid, dtype=torch.bool))
    with torch.no_grad():
        dense_out = dense_features(dense, [s.name for s in encoder.stages], images)
    for i, (a, b) in enumerate(zip(sparse_out, dense_out)):
        assert_rel(a.detach(), b, 1e-5, f"stage {i}")


def test_source_model_is_untouched_by_training_the_encoder():
    model = make_model("user_cnn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    encoder = sparkme.sparsify(model, stages=USER_STAGES)
    encoder(torch.randn(2, 3, 32, 48), random_visible(2, (4, 6), 0.5))[0].sum().backward()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
