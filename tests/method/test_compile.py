"""``torch.compile(SparK)``: the sparse encoder runs eagerly, densify, decoder and loss are compiled.

Compiled float32 results are held to the float32 eager run's own distance from a float64 eager
ground truth (forward and every gradient).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import sparkme
from sparkme.engine.encoder import SparseEncoder

SIZE = 32
ULP = torch.finfo(torch.float32).eps
# Slack beyond twice the eager error, in float32 ulps: AOT autograd replays eager's ops; inductor's
# generated kernels reorder reductions and fuse BatchNorm into one pass (measured: <= ~70 ulps).
SLACK = {"aot_eager": 8 * ULP, "inductor": 128 * ULP}


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=4, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(self.stem(x)))


def _spark(backend: str) -> nn.Module:
    torch.manual_seed(0)
    encoder = sparkme.sparsify(SmallCNN(), stages=["stage1", "stage2"], backend=backend)
    return sparkme.SparK(encoder, mask_ratio=0.5, decoder_width=16).train()


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    order = torch.rand(3, 16, generator=generator).argsort(dim=1)
    return images.to(dtype), (order < 8).reshape(3, 4, 4)


def _run(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Loss, prediction and every gradient of one training step (BatchNorm statistics updated)."""
    images, mask = _inputs(dtype)
    images.requires_grad_(True)
    loss, pred, _ = model(images, mask=mask)
    loss.backward()
    module = getattr(model, "_orig_mod", model)
    grads = {f"grad {k}": p.grad for k, p in module.named_parameters() if p.grad is not None}
    buffers = {f"buffer {k}": b for k, b in module.named_buffers() if b.is_floating_point()}
    return {"loss": loss.detach(), "pred": pred.detach(), "images grad": images.grad, **grads, **buffers}


def _errors(result: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative max error per entry; gradients are measured in units of the largest one (a conv bias
    before a train-mode BatchNorm has a zero gradient in exact arithmetic: only rounding noise, and
    MinkowskiEngine's threaded float32 sums make that noise differ from run to run)."""
    grad_scale = max(float(v.abs().max()) for k, v in truth.items() if k.startswith("grad"))
    errors = {}
    for key, expected in truth.items():
        scale = max(float(expected.abs().max()), grad_scale if key.startswith("grad") else 1e-30)
        errors[key] = float((result[key].double() - expected).abs().max()) / scale
    return errors


def _check_against_float64(backend: str, compile_backend: str) -> None:
    reference = _spark(backend)
    truth = _run(copy.deepcopy(reference).double(), torch.float64)
    eager = _errors(_run(copy.deepcopy(reference), torch.float32), truth)
    compiled = _errors(_run(torch.compile(copy.deepcopy(reference), backend=compile_backend), torch.float32), truth)
    assert set(compiled) == set(truth) and any(k.startswith("grad encoder.") for k in truth)
    worse = {k: (compiled[k], eager[k]) for k in truth if compiled[k] > 2 * eager[k] + SLACK[compile_backend]}
    assert not worse, worse


def test_encoder_is_excluded_and_the_dense_part_is_compiled() -> None:
    assert all(getattr(SparseEncoder, name)._torchdynamo_disable for name in ("forward", "forward_maps"))
    counter = CompileCounterWithBackend("eager")
    model = torch.compile(_spark("gather"), backend=counter)
    images, mask = _inputs(torch.float32)
    model(images, mask=mask)[0].backward()
    inputs = [n.name for g in counter.graphs for n in g.graph.nodes if n.op == "placeholder"]
    calls = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert not any("modules_encoder_" in name for name in inputs)  # no encoder weight enters a graph
    assert any("modules_decoder_" in name for name in inputs) and any("conv_transpose2d" in c for c in calls)
    assert any("densify_modules_projections" in name for name in inputs)  # densify's projections (the fill is eager)
    assert any("l_pred_" in name for name in inputs)  # the loss


def test_compiled_with_a_generator_draws_the_eager_mask() -> None:
    eager, compiled = _spark("gather"), torch.compile(_spark("gather"), backend="aot_eager")
    images, _ = _inputs(torch.float32)
    loss, _, mask = eager(images, generator=torch.Generator().manual_seed(3))
    loss_c, _, mask_c = compiled(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask, mask_c)
    assert abs(loss.item() - loss_c.item()) <= 8 * ULP * loss.item()


@pytest.mark.parametrize("backend", ["gather", "minkowski"])
def test_aot_autograd_matches_eager(backend: str) -> None:
    """Graph capture and AOT autograd (no code generation): fast enough for every run."""
    _check_against_float64(backend, "aot_eager")


@pytest.mark.slow
def test_inductor_matches_eager() -> None:
    """The default ``torch.compile`` backend, generated CPU kernels included (slow: a C++ compile)."""
    _check_against_float64("gather", "inductor")
