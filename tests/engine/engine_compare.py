"""Engine test helpers: run the sparse encoder and the masked-dense reference on the same inputs and
compare features, BatchNorm statistics, the input gradient and every parameter gradient.

Tolerances come from measurement, never from one CPU's numbers:
- in float64 the sparse result must equal the reference to round-off (``F64_TOL``: a BatchNorm
  over two visible sites at mask ratio 0.9 amplifies float64 round-off to 1e-9; a doubled
  LayerNorm eps is 5e-5 off and fails);
- in a lower precision, the float64 reference on the same (rounded) weights and inputs is the
  truth, and the sparse error against it may be at most twice the reference's own error in that
  precision plus a few float32 rounding units (:func:`assert_as_accurate`). Gradients are measured
  in units of the model's largest gradient: a conv bias before a train-mode BatchNorm has a zero
  gradient in exact arithmetic and only rounding noise in any finite precision.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from engine_reference import USER_STAGES, make_model, masked_reference, reference_features, to_pixels

import sparkme

F64_TOL = 1e-8
SIZES = {"user_cnn": (32, 48), "user_cnn_syncbn": (32, 48)}  # patch 8; timm models: patch 32
DEFAULT_SIZE = (64, 96)
BACKENDS = ["gather", "minkowski"]


def relative_error(actual: torch.Tensor, truth: torch.Tensor, floor: float = 0.0) -> float:
    """max |a - t| / max(max |t|, floor), in float64: the float64 exactness measure."""
    assert actual.shape == truth.shape, f"shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    scale = max(truth.double().abs().max().item(), floor)
    return (actual.double() - truth.double()).abs().max().item() / max(scale, 1e-300)


def norm_error(actual: torch.Tensor, truth: torch.Tensor, floor: float = 0.0) -> float:
    """||a - t|| / max(||t||, floor * sqrt(numel)), in float64. Norm-wise, so that one lucky or
    unlucky element does not decide a comparison of two rounding errors."""
    assert actual.shape == truth.shape, f"shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    scale = max(truth.double().norm().item(), floor * truth.numel() ** 0.5)
    return (actual.double() - truth.double()).norm().item() / max(scale, 1e-300)


ROUNDING_SLACK = 4 * torch.finfo(torch.float32).eps


def assert_as_accurate(
    actual: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, what: str, floor: float = 0.0
) -> tuple[float, float]:
    """``err(actual) <= 2 * err(reference) + ROUNDING_SLACK``, both errors norm-wise against the
    float64 truth. ``reference`` is an independent implementation computed in the same dtype as
    ``actual``; ``floor`` is the scale for tensors that are (nearly) zero in exact arithmetic."""
    err, ref_err = norm_error(actual, truth, floor), norm_error(reference, truth, floor)
    bound = 2 * ref_err + ROUNDING_SLACK
    assert err <= bound, f"{what}: error {err:.3g} > 2 x reference error {ref_err:.3g} + {ROUNDING_SLACK:.2g}"
    return err, ref_err


@dataclass
class Outcome:
    """What one implementation computed: stage features, buffers, input and parameter gradients."""

    features: list[torch.Tensor]
    buffers: dict[str, torch.Tensor]
    input_grad: torch.Tensor | None = None
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)


def _finish(model, features, images, weights, backward: bool) -> Outcome:
    outcome = Outcome([f.detach() for f in features], {k: v.detach().clone() for k, v in model.named_buffers()})
    if backward:
        sum((f * w.to(f.dtype)).sum() for f, w in zip(features, weights)).backward()
        outcome.input_grad = images.grad
        outcome.grads = {k: p.grad for k, p in model.named_parameters()}
    return outcome


def run_sparse(encoder, images, visible, weights, backward: bool) -> Outcome:
    images = images.clone().requires_grad_(backward)
    torch.manual_seed(42)  # the same drop-path draws on every side
    return _finish(encoder.model, encoder(images, visible), images, weights, backward)


def run_reference(model, stage_names, images, pixels, weights, backward: bool) -> Outcome:
    reference = masked_reference(model, pixels)
    images = images.clone().requires_grad_(backward)
    torch.manual_seed(42)
    return _finish(reference, reference_features(reference, stage_names, images, pixels), images, weights, backward)


@dataclass
class Case:
    """One comparison: the model, its sparse encoder, inputs and a mask."""

    model: torch.nn.Module
    encoder: object
    images: torch.Tensor
    visible: torch.Tensor
    pixels: torch.Tensor
    weights: list[torch.Tensor]


def make_case(name, visible_fn, train, dtype, size, device, backend, drop_path_rate) -> Case:
    model = make_model(name, drop_path_rate).to(device=device, dtype=dtype)
    model.train(train)
    encoder = sparkme.sparsify(model, stages=USER_STAGES if name.startswith("user_cnn") else None, backend=backend)
    assert encoder.backend == backend
    height, width = size or SIZES.get(name, DEFAULT_SIZE)
    patch = encoder.downsample_ratio
    visible = visible_fn((height // patch, width // patch)).to(device)
    pixels = to_pixels(visible, (height, width))
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(visible.shape[0], 3, height, width, generator=generator, dtype=dtype).to(device)
    weights = []
    for stride, channels in zip(encoder.feature_strides, encoder.feature_channels):
        shape = (visible.shape[0], channels, -(-height // stride), -(-width // stride))
        weights.append(torch.randn(shape, generator=generator, dtype=dtype).to(device))
    return Case(model, encoder, images, visible, pixels, weights)


def compare(
    name: str,
    visible_fn,
    train: bool,
    dtype=torch.float64,
    size=None,
    device: str = "cpu",
    backward: bool = True,
    drop_path_rate: float = 0.0,
    backend: str = "gather",
) -> None:
    """Engine vs the independent masked-dense reference: features (zero at hidden sites), BatchNorm
    statistics, input gradient and every parameter gradient."""
    case = make_case(name, visible_fn, train, dtype, size, device, backend, drop_path_rate)
    names = [s.name for s in case.encoder.stages]
    sparse = run_sparse(case.encoder, case.images, case.visible, case.weights, backward)
    for i, feature in enumerate(sparse.features):
        stride = case.encoder.feature_strides[i]
        hidden = ~case.pixels[:, :, ::stride, ::stride]
        assert (feature * hidden).abs().max() == 0, f"{name} stage {i}: non-zero feature at a hidden site"
    same = run_reference(case.model, names, case.images, case.pixels, case.weights, backward)
    if dtype == torch.float64:
        check = _check_exact
        truth = same
    else:
        wide = copy.deepcopy(case.model).double()
        truth = run_reference(wide, names, case.images.double(), case.pixels, case.weights, backward)
        check = _check_as_accurate
    _compare_outcomes(name, sparse, same, truth, check, train, backward)


def _check_exact(actual, _reference, truth, what: str, floor: float = 0.0) -> None:
    err = relative_error(actual, truth, floor)
    assert err <= F64_TOL, f"{what}: relative error {err:.3g} > {F64_TOL:g}"


def _check_as_accurate(actual, reference, truth, what: str, floor: float = 0.0) -> None:
    assert_as_accurate(actual, reference, truth, what, floor)


def _compare_outcomes(name, sparse: Outcome, same: Outcome, truth: Outcome, check, train, backward) -> None:
    for i, (a, b, t) in enumerate(zip(sparse.features, same.features, truth.features)):
        check(a, b, t, f"{name} stage {i} features")
    if train:
        for key, a in sparse.buffers.items():
            if a.is_floating_point():
                check(a, same.buffers[key], truth.buffers[key], f"{name} buffer {key}")
            else:
                assert torch.equal(a, truth.buffers[key]), key
    if not backward:
        return
    check(sparse.input_grad, same.input_grad, truth.input_grad, f"{name} input grad")
    scale = max(g.abs().max().item() for g in truth.grads.values() if g is not None)
    checked = 0
    for key, a in sparse.grads.items():
        b, t = same.grads[key], truth.grads[key]
        if t is None:
            assert a is None or a.abs().max() == 0, f"{name}: {key} has a gradient only in the sparse encoder"
            continue
        assert a is not None, f"{name}: {key} has no gradient in the sparse encoder"
        check(a, b, t, f"{name} grad {key}", floor=scale if check is _check_as_accurate else 1e-3 * scale)
        checked += 1
    assert checked > 0
