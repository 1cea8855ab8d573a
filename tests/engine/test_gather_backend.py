"""Layer-level exactness of the "gather" backend against MinkowskiEngine and a masked dense conv
(float64 to round-off; float32 and bf16 as accurate as the reference in the same dtype)."""

from __future__ import annotations

import MinkowskiEngine as ME
import pytest
import torch
import torch.nn.functional as F
from engine_compare import assert_as_accurate

from sparkme.engine.backends import get_backend
from sparkme.engine.backends.neighbours import neighbour_plan

SIZE = 16
BATCH = 2

# (name, in, out, kernel, stride, dilation, groups)
CASES = [
    ("1x1", 8, 12, 1, 1, 1, 1),
    ("1x1/s2", 8, 12, 1, 2, 1, 1),
    ("3x3", 6, 10, 3, 1, 1, 1),
    ("7x7/s2", 3, 8, 7, 2, 1, 1),
    ("3x3/s2", 6, 10, 3, 2, 1, 1),
    ("4x4/s4", 3, 8, 4, 4, 1, 1),
    ("2x2/s2", 6, 10, 2, 2, 1, 1),
    ("3x3/d2", 6, 10, 3, 1, 2, 1),
    ("3x3/g32", 64, 64, 3, 1, 1, 32),
    ("3x3/s2/g32", 64, 64, 3, 2, 1, 32),
    ("1x1/g4", 16, 8, 1, 1, 1, 4),
    ("dw7x7", 8, 8, 7, 1, 1, 8),
    ("dw3x3/s2", 8, 8, 3, 2, 1, 8),
]
ME_CASES = [case for case in CASES if case[6] == 1]


def _visible(generator: torch.Generator, patch: int = 2) -> torch.Tensor:
    """Random patch mask [B, 1, SIZE, SIZE]; some whole border rows and columns hidden."""
    grid = SIZE // patch
    keep = torch.rand(BATCH, 1, grid, grid, generator=generator) < 0.5
    keep[:, :, 0, :] = False  # a hidden border row must not shift anything
    keep[0, 0, 1, 1] = True
    return keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def _sparse(dense: torch.Tensor, visible: torch.Tensor) -> ME.SparseTensor:
    index = visible[:, 0].nonzero()
    coordinates = index.int().contiguous()
    features = dense.permute(0, 2, 3, 1)[index[:, 0], index[:, 1], index[:, 2]]
    return ME.SparseTensor(features.contiguous(), coordinates=coordinates)


def _at_sites(dense: torch.Tensor, coordinates: torch.Tensor, stride: int) -> torch.Tensor:
    coordinates = coordinates.long()
    return dense[coordinates[:, 0], :, coordinates[:, 1] // stride, coordinates[:, 2] // stride]


def _padding(kernel: int, dilation: int) -> int:
    return (kernel // 2) * dilation if kernel % 2 else 0


def _problem(case, dtype: torch.dtype, bias: bool, seed: int = 0):
    _, cin, cout, kernel, stride, dilation, groups = case
    generator = torch.Generator().manual_seed(seed)
    visible = _visible(generator, patch=max(stride, 2))
    images = torch.randn(BATCH, cin, SIZE, SIZE, generator=generator, dtype=dtype)
    weight = torch.randn(cout, cin // groups, kernel, kernel, generator=generator, dtype=dtype) / (cin * kernel)
    bias_t = torch.randn(cout, generator=generator, dtype=dtype) if bias else None
    return images, visible, weight, bias_t


def _gather_run(images, visible, weight, bias, stride, dilation, groups):
    x = _sparse(images, visible)
    features = x.F.detach().requires_grad_(True)
    x = ME.SparseTensor(features, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True) if bias is not None else None
    out = get_backend("gather")(x, weight, bias, stride=(stride, stride), dilation=(dilation, dilation), groups=groups)
    return x, features, weight, bias, out


def _check(actual: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """float64: equal to round-off; lower precisions: as accurate as ``reference`` in that dtype,
    both measured against the float64 ``truth``."""
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, truth, rtol=1e-10, atol=1e-10, msg=what)
    else:
        assert_as_accurate(actual, reference, truth, what)


def _dense_conv(images, visible, weight, bias, case, coords: torch.Tensor, grad: torch.Tensor):
    """Masked dense conv at the sparse output sites: (output, input grad, weight grad, bias grad)."""
    _, _, _, kernel, stride, dilation, groups = case
    images = (images * visible).requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True) if bias is not None else None
    dense = F.conv2d(images, weight, bias, stride, _padding(kernel, dilation), dilation, groups)
    dense_grad = torch.zeros_like(dense)
    dense_grad[coords[:, 0], :, coords[:, 1] // stride, coords[:, 2] // stride] = grad.to(dense.dtype)
    dense.backward(dense_grad)
    bias_grad = bias.grad if bias is not None else None
    return _at_sites(dense, coords, stride), images.grad, weight.grad, bias_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_matches_masked_dense_conv(case, bias: bool, dtype: torch.dtype) -> None:
    _, _, _, kernel, stride, dilation, groups = case
    images, visible, weight, bias_t = _problem(case, dtype, bias)
    x, features, weight_s, bias_s, out = _gather_run(images, visible, weight, bias_t, stride, dilation, groups)

    out_visible = F.max_pool2d(visible.to(dtype), stride, stride) > 0 if stride > 1 else visible
    expected_sites = out_visible[:, 0].nonzero().int()
    sites = out.C.clone()
    sites[:, 1:] //= stride
    assert sorted(map(tuple, sites.tolist())) == sorted(map(tuple, expected_sites.tolist()))

    grad = torch.randn(out.F.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    out.F.backward(grad)
    coords = out.C.long()
    same = _dense_conv(images, visible, weight, bias_t, case, coords, grad)
    wide = bias_t.double() if bias else None
    truth = _dense_conv(images.double(), visible, weight.double(), wide, case, coords, grad)
    _check(out.F, same[0], truth[0], "output")
    _check(features.grad, _at_sites(same[1], x.C, 1), _at_sites(truth[1], x.C, 1), "input grad")
    _check(weight_s.grad, same[2], truth[2], "weight grad")
    if bias:
        _check(bias_s.grad, same[3], truth[3], "bias grad")


def _minkowski_conv(weight, bias, kernel, stride, dilation) -> ME.MinkowskiConvolution:
    cout, cin = weight.shape[:2]
    conv = ME.MinkowskiConvolution(cin, cout, kernel, stride, dilation, bias=bias is not None, dimension=2)
    conv = conv.to(weight.dtype)
    with torch.no_grad():
        if conv.use_mm:
            conv.kernel.copy_(weight[:, :, 0, 0].t())
        else:
            conv.kernel.copy_(weight.permute(3, 2, 1, 0).reshape(kernel * kernel, cin, cout))
        if bias is not None:
            conv.bias.copy_(bias.view(1, -1))
    return conv


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", ME_CASES, ids=[case[0] for case in ME_CASES])
def test_matches_minkowski_convolution(case, bias: bool, dtype: torch.dtype) -> None:
    _, cin, cout, kernel, stride, dilation, _ = case
    images, visible, weight, bias_t = _problem(case, dtype, bias)
    x, features, weight_s, bias_s, out = _gather_run(images, visible, weight, bias_t, stride, dilation, 1)
    grad = torch.randn(out.F.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    out.F.backward(grad)
    same = _minkowski_run(x, weight, bias_t, case, grad)
    assert same[0].coordinate_map_key == out.coordinate_map_key
    truth = _minkowski_run(x, weight.double(), bias_t.double() if bias else None, case, grad.double())
    _check(out.F, same[0].F, truth[0].F, "output")
    _check(features.grad, same[1], truth[1], "input grad")
    _check(weight_s.grad, same[2], truth[2], "weight grad")
    if bias:
        _check(bias_s.grad, same[3], truth[3], "bias grad")


def _minkowski_run(x: ME.SparseTensor, weight, bias, case, grad):
    """MinkowskiEngine's own convolution in ``weight``'s dtype: (output, input grad, weight grad, bias grad)."""
    _, cin, cout, kernel, stride, dilation, _ = case
    features = x.F.detach().to(weight.dtype).requires_grad_(True)
    x_me = ME.SparseTensor(features, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
    conv = _minkowski_conv(weight, bias, kernel, stride, dilation)
    out = conv(x_me)
    out.F.backward(grad)
    if conv.use_mm:
        weight_grad = conv.kernel.grad.t().reshape(cout, cin, 1, 1)
    else:
        weight_grad = conv.kernel.grad.reshape(kernel, kernel, cin, cout).permute(3, 2, 1, 0)
    return out, features.grad, weight_grad, conv.bias.grad.view(-1) if bias is not None else None


def test_plans_are_cached_per_manager_and_shared_between_layers() -> None:
    case = CASES[2]
    images, visible, weight, _ = _problem(case, torch.float32, False)
    x = _sparse(images, visible)
    first = neighbour_plan(x, x.coordinate_map_key, (3, 3), (1, 1), (1, 1))
    again = neighbour_plan(x, x.coordinate_map_key, (3, 3), (1, 1), (1, 1))
    dilated = neighbour_plan(x, x.coordinate_map_key, (3, 3), (2, 2), (1, 1))
    assert first is again
    assert dilated is not first
    other = _sparse(images, visible)
    assert neighbour_plan(other, other.coordinate_map_key, (3, 3), (1, 1), (1, 1)) is not first


def test_inverse_table_is_the_adjoint_of_gather() -> None:
    case = CASES[4]  # 3x3/s2: inputs feed up to 4 outputs each
    images, visible, _, _ = _problem(case, torch.float64, False)
    x = _sparse(images, visible)
    out_key = x.coordinate_manager.stride(x.coordinate_map_key, [2, 2])
    plan = neighbour_plan(x, out_key, (3, 3), (1, 1), (2, 2))
    rows = torch.randn(plan.num_in, 5, dtype=torch.float64)
    columns = torch.randn(plan.num_out * plan.volume, 5, dtype=torch.float64)
    lhs = (plan.gather(rows).view(-1, 5) * columns).sum()
    rhs = (rows * plan.scatter(columns)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    assert plan.inverse.shape[1] > 1


def test_bf16_autocast_runs_gemms_in_bf16() -> None:
    """Under autocast the GEMMs run in bf16 and are as accurate as a dense bf16 conv (fp64 truth)."""
    case = CASES[2]
    images, visible, weight, bias = _problem(case, torch.float32, True)
    x = _sparse(images, visible)
    coords = x.C.long()
    truth = _dense_conv(images.double(), visible, weight.double(), bias.double(), case, coords, torch.zeros(1))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = F.conv2d(images * visible, weight, bias, 1, 1)
    weight = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = get_backend("gather")(x, weight, bias, stride=(1, 1), dilation=(1, 1), groups=1)
    assert out.F.dtype == torch.bfloat16 and same.dtype == torch.bfloat16
    assert_as_accurate(out.F, _at_sites(same, coords, 1), truth, "bf16 output")
    out.F.float().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("weight_shape", "groups", "bias_shape", "message"),
    [
        ((10, 5, 3, 3), 1, None, "input has 6 channels"),
        ((10, 6, 3), 1, None, "weight must be"),
        ((10, 3, 3, 3), 3, None, "groups=3 must divide"),
        ((10, 6, 3, 3), 1, (3,), "bias must have shape"),
    ],
)
def test_bad_input_is_refused_clearly(weight_shape, groups, bias_shape, message) -> None:
    images, visible, _, _ = _problem(CASES[2], torch.float32, False)
    x = _sparse(images, visible)
    bias = torch.zeros(bias_shape) if bias_shape else None
    with pytest.raises(ValueError, match=message):
        get_backend("gather")(x, torch.zeros(weight_shape), bias, stride=(1, 1), dilation=(1, 1), groups=groups)
