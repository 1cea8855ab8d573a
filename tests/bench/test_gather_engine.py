"""The engine's own exactness tests (tests/engine) re-run with the "gather" conv backend.

``tests/engine/test_exactness.py::compare`` builds ``sparkme.sparsify(model)`` and checks features,
BatchNorm statistics and every gradient against an independent masked-dense reference; here
``sparsify`` is wrapped so every encoder it builds uses the gather backend.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import sparkme
from sparkme.engine import sparsify as engine_sparsify

_ENGINE_TESTS = Path(__file__).resolve().parents[1] / "engine"


def _engine_exactness():
    if str(_ENGINE_TESTS) not in sys.path:
        sys.path.insert(0, str(_ENGINE_TESTS))  # engine_reference, as tests/engine/conftest.py does
    spec = importlib.util.spec_from_file_location("engine_exactness_for_gather", _ENGINE_TESTS / "test_exactness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


exactness = _engine_exactness()
reference = sys.modules["engine_reference"]


@pytest.fixture(autouse=True)
def gather_backend(monkeypatch: pytest.MonkeyPatch):
    def sparsify_with_gather(cnn, stages=None, backend="minkowski"):
        encoder = engine_sparsify(cnn, stages=stages, backend="gather")
        assert encoder.backend == "gather"
        return encoder

    monkeypatch.setattr(sparkme, "sparsify", sparsify_with_gather)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "user_cnn"])
def test_matches_masked_dense(name: str) -> None:
    exactness.compare(name, lambda grid: reference.random_visible(2, grid, 0.6, seed=6), train=True)


def test_border_rows_and_columns_hidden() -> None:
    exactness.compare("convnext_atto", lambda grid: reference.border_visible(2, grid), train=True)


def test_float32() -> None:
    exactness.compare(
        "resnet18",
        lambda grid: reference.random_visible(2, grid, 0.6, seed=7),
        train=True,
        dtype=torch.float32,
        tol=2e-4,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnext50_32x4d", "convnext_tiny"])  # grouped 3x3, depthwise 7x7 at full size
def test_families(name: str) -> None:
    exactness.compare(name, lambda grid: reference.random_visible(2, grid, 0.6, seed=11), train=True, size=(64, 64))
