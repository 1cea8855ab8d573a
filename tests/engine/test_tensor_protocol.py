"""Model code that treats activations as tensors: views, in-place ops, reductions with ``dtype=``,
indexing, Python protocols, and the encoder's own control flow. Each either computes the
masked-dense answer or raises ``UnsupportedLayerError`` naming the module; never a wrong number."""

from __future__ import annotations

import pytest
import torch
from engine_compare import BACKENDS, F64_TOL, relative_error
from engine_reference import masked_reference, random_visible, reference_features, to_pixels
from torch import nn

import sparkme
from sparkme.engine import UnsupportedLayerError

SIZE = (32, 48)  # patch 8


class Lambda(nn.Module):
    """Model code between layers (not a leaf: the engine checks leaves, and runs any code between them)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.inner = nn.Identity()

    def forward(self, x):
        return self.fn(self.inner(x))


def encoder_of(middle: nn.Module, backend: str = "gather") -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), middle, nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)
    ).double()
    return model, sparkme.sparsify(model, stages=["2", "4"], backend=backend)


def assert_masked_dense(middle: nn.Module, backend: str = "gather") -> list[torch.Tensor]:
    """The sparse encoder equals the masked-dense reference on a model with ``middle`` after a conv."""
    model, encoder = encoder_of(middle, backend)
    visible = random_visible(2, (SIZE[0] // 8, SIZE[1] // 8), 0.5, seed=3)
    pixels = to_pixels(visible, SIZE)
    images = torch.randn(2, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sparse = encoder(images, visible)
    dense = reference_features(masked_reference(model, pixels), ["2", "4"], images, pixels)
    for i, (a, b) in enumerate(zip(sparse, dense)):
        assert a.dtype == b.dtype, f"stage {i}: dtype {a.dtype} != {b.dtype}"
        assert relative_error(a, b) <= F64_TOL, f"stage {i}: relative error {relative_error(a, b):.3g}"
    return sparse


def refused(middle: Lambda, needle: str) -> str:
    _, encoder = encoder_of(Lambda(lambda x: x))
    encoder.model.get_submodule("2").fn = middle.fn  # after sparsify: its dense probe runs the model code
    visible = torch.ones(1, 1, SIZE[0] // 8, SIZE[1] // 8, dtype=torch.bool)
    with pytest.raises(UnsupportedLayerError) as info:
        encoder(torch.randn(1, 3, *SIZE, dtype=torch.float64), visible)
    message = str(info.value)
    assert needle in message and "in module 2 (Lambda)" in message, message
    return message


def _inplace_on_permuted_view(x):
    view = x.permute(0, 2, 3, 1)
    view.mul_(2)  # a view: x changes too
    return x + 1


def _inplace_on_contiguous_copy(x):
    copy = x.permute(0, 2, 3, 1).contiguous()
    copy.mul_(2)  # a copy: x does not change
    return x + copy.permute(0, 3, 1, 2)


def _inplace_on_source_seen_by_view(x):
    view = x.permute(0, 2, 3, 1)
    torch.sigmoid_(x)
    return view.permute(0, 3, 1, 2) * 3


def _channel_slices(x):
    head, tail = x[:, :3], x[:, 3:]
    tail.mul_(-1)  # written through to x
    return torch.cat([x[:, 4:], head * 2, x[..., 1:2, :, :] + 1], dim=1)


def _channels_last_slice(x):
    last = x.permute(0, 2, 3, 1)
    last[..., ::2].add_(5)
    return x


def _reduction_dtype(x):
    return x * (x.sum((2, 3), keepdim=True, dtype=torch.float32).dtype == torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "fn",
    [
        _inplace_on_permuted_view,
        _inplace_on_contiguous_copy,
        _inplace_on_source_seen_by_view,
        _channel_slices,
        _channels_last_slice,
        _reduction_dtype,
    ],
)
def test_views_inplace_ops_slices_and_dtypes_match_masked_dense(fn, backend: str):
    assert_masked_dense(Lambda(fn), backend)


@pytest.mark.parametrize(
    "fn,needle",
    [
        (lambda x: x[0], "only slices of the channel dim"),
        (lambda x: x[:, :, 1:], "only slices of the channel dim"),
        (lambda x: x[:, 2], "only slices of the channel dim"),
        (lambda x: x.view(2, 8, -1), "Tensor.view"),
        (lambda x: x.detach(), "Tensor.detach"),
        (lambda x: x if x == x else x, "Tensor.__eq__"),
        (lambda x: x if x else x, "Tensor.__bool__"),
        (lambda x: [r for r in x][0], "Tensor.__iter__"),
        (lambda x: x @ torch.ones(1), "Tensor.__matmul__"),
        (lambda x: x.mean((2, 3), out=torch.empty(0)), "mean with these arguments"),
        (lambda x: torch.flip(x, (2,)), "torch.flip"),
    ],
)
def test_tensor_methods_without_a_sparse_twin_are_refused(fn, needle: str):
    refused(Lambda(fn), needle)


def test_setitem_is_refused():
    def write(x):
        x[:, :2] = 0
        return x

    refused(Lambda(write), "Tensor.__setitem__")


def test_len_is_the_batch():
    assert_masked_dense(Lambda(lambda x: x * len(x)))


class CatchesEverything(nn.Module):
    """Model code with a broad ``except Exception`` around its body (fallback paths exist in the wild)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1))
        self.fallbacks = 0

    def forward(self, x):
        try:
            return self.body(x)
        except Exception:
            self.fallbacks += 1
            return self.body(x)


def test_stop_signals_are_not_caught_by_model_code():
    model = CatchesEverything()
    encoder = sparkme.sparsify(model, stages=["body.0", "body.1"])  # the probe stops after body.1
    assert model.fallbacks == 0 and encoder.model.fallbacks == 0
    encoder(torch.randn(1, 3, 16, 16), torch.ones(1, 1, 4, 4, dtype=torch.bool))
    assert encoder.model.fallbacks == 0


class BrokenAfterTheStages(nn.Module):
    """A bug in the model's own code (not a head built for another size) after the stages ran."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1))

    def forward(self, x):
        x = self.body(x)
        raise KeyError("a bug in forward")


def test_stage_probe_reports_errors_it_does_not_expect():
    with pytest.raises(ValueError, match="a bug in forward"):
        sparkme.sparsify(BrokenAfterTheStages())
