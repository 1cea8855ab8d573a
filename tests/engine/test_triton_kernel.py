"""The "triton" backend's fused gather-GEMM kernels, run by Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Forward, input gradient and weight gradient of real MinkowskiEngine kernel maps (3x3, a 1x1 plan,
a non-square kernel, strided 2x2/s2, 3x3/s2 and 1x1/s2 plans) in fp32 and fp16 must be as accurate
as the gather backend in the same dtype, both measured against the gather backend in float64. The
interpreter computes fp32 and fp16 ``tl.dot`` exactly but not bf16, so bf16 is checked on a GPU
only (``-m gpu``). The kernels are also compiled for sm_90 here (no GPU needed) to catch what the
interpreter accepts and the compiler does not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from engine_compare import _check_as_accurate, _compare_outcomes, assert_as_accurate, compare, run_sparse
from engine_reference import USER_STAGES, make_model, random_visible

pytest.importorskip("triton")

import MinkowskiEngine as ME  # noqa: E402

import sparkme  # noqa: E402
from sparkme.engine.backends import get_backend  # noqa: E402
from sparkme.engine.backends.neighbours import neighbour_plan  # noqa: E402
from sparkme.engine.backends.triton_gather import _TritonConvFunction, conv_matrix  # noqa: E402

# (name, in, out, kernel (kh, kw), stride, dilation)
CASES = [
    ("3x3", 16, 24, (3, 3), 1, 1),
    ("3x5", 8, 12, (3, 5), 1, 1),
    ("3x3/d2", 12, 16, (3, 3), 1, 2),
    ("2x2/s2", 16, 32, (2, 2), 2, 1),
    ("3x3/s2", 16, 24, (3, 3), 2, 1),
    ("1x1/s2", 24, 32, (1, 1), 2, 1),
    ("7x7/s2", 3, 16, (7, 7), 2, 1),
]


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's CPU interpreter for this test (the kernels are wrapped per mode on first use)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _sparse_input(channels: int, dtype: torch.dtype, seed: int = 0, size: int = 16) -> ME.SparseTensor:
    """About 250 random visible sites of a 2 x size x size grid, 2x2 patches (an even-sided map)."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, size // 2, size // 2, generator=generator) < 0.5
    keep[0, 0, 0] = True
    pixels = keep.repeat_interleave(2, 1).repeat_interleave(2, 2)
    coordinates = pixels.nonzero().int().contiguous()
    features = torch.randn(coordinates.shape[0], channels, generator=generator).to(dtype)
    return ME.SparseTensor(features, coordinates=coordinates)


def _run(backend: str, x: ME.SparseTensor, weight: torch.Tensor, bias: torch.Tensor, grad_seed: int, case):
    """(output, input grad, weight grad, bias grad) of one backend in ``weight``'s dtype."""
    _, _, _, _, stride, dilation = case
    features = x.F.detach().to(weight.dtype).requires_grad_(True)
    x = ME.SparseTensor(features, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    out = get_backend(backend)(x, weight, bias, stride=(stride, stride), dilation=(dilation, dilation), groups=1)
    grad = torch.randn(out.F.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.F)
    out.F.backward(grad)
    return out.F, features.grad, weight.grad, bias.grad


def _weights(case, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    _, cin, cout, (kh, kw), _, _ = case
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(cout, cin, kh, kw, generator=generator) / (cin * kh * kw) ** 0.5
    return weight.to(dtype), torch.randn(cout, generator=generator).to(dtype)


def _assert_layer_as_accurate(case, dtype: torch.dtype, device: str = "cpu", autocast: bool = False) -> None:
    x = _sparse_input(case[1], dtype if not autocast else torch.float32)
    x = ME.SparseTensor(x.F.to(device), coordinates=x.C.to(device), device=device)
    weight, bias = _weights(case, x.F.dtype)
    weight, bias = weight.to(device), bias.to(device)
    with torch.autocast(device, dtype=dtype, enabled=autocast):
        actual = _run("triton", x, weight, bias, 2, case)
        reference = _run("gather", x, weight, bias, 2, case)
    truth = _run("gather", x, weight.double(), bias.double(), 2, case)
    assert actual[0].dtype == (dtype if autocast else x.F.dtype)
    for what, a, r, t in zip(("output", "input grad", "weight grad", "bias grad"), actual, reference, truth):
        assert a.dtype == r.dtype, f"{case[0]} {what}: {a.dtype} vs the gather backend's {r.dtype}"
        _check_as_accurate(a, r, t, f"{case[0]} {what}")


LAYER_RUNS = [(case, torch.float32) for case in CASES] + [
    (case, torch.float16) for case in CASES if case[0] in ("3x3", "2x2/s2", "3x3/s2")
]


@pytest.mark.parametrize(
    ("case", "dtype"), LAYER_RUNS, ids=[f"{case[0]}-{str(dtype)[6:]}" for case, dtype in LAYER_RUNS]
)
def test_layer_as_accurate_as_gather(case, dtype: torch.dtype, interpreter) -> None:
    _assert_layer_as_accurate(case, dtype)


def test_one_by_one_plan_through_the_kernel(interpreter) -> None:
    """A 1x1 stride-1 conv is a plain GEMM in the backend; its plan still runs through the kernels,
    as accurate as that GEMM in fp32 against float64."""
    x = _sparse_input(20, torch.float32)
    plan = neighbour_plan(x, x.coordinate_map_key, (1, 1), (1, 1), (1, 1))
    weight, _ = _weights(("1x1", 20, 28, (1, 1), 1, 1), torch.float32)
    grad = torch.randn(x.F.shape[0], 28, generator=torch.Generator().manual_seed(3))
    runs = []
    for dtype, kernel in ((torch.float32, True), (torch.float32, False), (torch.float64, False)):
        features = x.F.detach().to(dtype).requires_grad_(True)
        matrix = conv_matrix(weight.to(dtype)).detach().requires_grad_(True)
        out = _TritonConvFunction.apply(features, matrix, plan) if kernel else features @ matrix[0]
        out.backward(grad.to(dtype))
        runs.append((out, features.grad, matrix.grad))
    for what, actual, reference, truth in zip(("output", "input grad", "weight grad"), *runs):
        _check_as_accurate(actual, reference, truth, what)


def test_tiny_cnn_as_accurate_as_gather(interpreter) -> None:
    """A sparsified CNN (strided, non-square, dilated, grouped, depthwise convs; BN, GN, SE, pools) on
    backend "triton": features, input grad and every parameter grad as accurate as "gather" in fp32.

    In eval mode: BatchNorm's batch statistics over the handful of sites of this small image would
    amplify each run's rounding noise (either backend then wins by chance); the convolutions are
    what differ here."""
    model = make_model("user_cnn").eval()
    visible = random_visible(2, (2, 4), 0.5, seed=4)  # patch 8: a 16 x 32 image
    images = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(3))
    runs = {}
    for kind, backend, dtype in (("triton", "triton", torch.float32), ("gather", "gather", torch.float32)):
        encoder = sparkme.sparsify(copy.deepcopy(model).to(dtype), stages=USER_STAGES, backend=backend)
        weights = _stage_weights(encoder, images, dtype)
        runs[kind] = run_sparse(encoder, images.to(dtype), visible, weights, backward=True)
    wide = sparkme.sparsify(copy.deepcopy(model).double(), stages=USER_STAGES, backend="gather")
    truth = run_sparse(wide, images.double(), visible, _stage_weights(wide, images, torch.float64), backward=True)
    _compare_outcomes("user_cnn", runs["triton"], runs["gather"], truth, _check_as_accurate, False, True)


def _stage_weights(encoder, images: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    height, width = images.shape[-2:]
    shapes = [(2, c, height // s, width // s) for s, c in zip(encoder.feature_strides, encoder.feature_channels)]
    return [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]


def test_cpu_tensors_are_refused_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = _sparse_input(16, torch.float32)
    weight, bias = _weights(CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors.*backend='gather'"):
        get_backend("triton")(x, weight, bias, stride=(1, 1), dilation=(1, 1), groups=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_compile_for_sm90(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both kernels in the tile sizes and launch options the launchers pick compile to an sm_90 cubin
    (no GPU needed)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparkme.engine.kernels import gather_gemm as kernels

    pointer = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    jobs = [
        (kernels._gather_gemm_kernel, kernels.gemm_config(5000, 64, 128, dtype) | {"REVERSE": True}, ["*"] * 4),
        (kernels._weight_grad_kernel, kernels.weight_grad_config(64, 128, dtype), ["*fp32", "*", "*i64", "*"]),
    ]
    for function, constants, pointers in jobs:
        names = list(function.__code__.co_varnames[: function.__code__.co_argcount])
        signature = {name: "i32" for name in names}
        for name, kind in zip(names, pointers):
            signature[name] = pointer if kind == "*" else kind
        signature["table_ptr"] = "*i64"
        signature |= {name: "constexpr" for name in constants}
        source = ASTSource(triton.jit(function), signature, constants)
        options = kernels.launch_options(dtype)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert len(compiled.asm["cubin"]) > 0, function.__name__


def test_autocast_dtype_is_used(interpreter) -> None:
    """Under autocast the kernels compute in autocast's dtype (fp16 here: the interpreter's bf16 dot is
    wrong) and return fp32 gradients for fp32 parameters, as accurate as the gather backend."""
    _assert_layer_as_accurate(CASES[4], torch.float16, autocast=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_layer_as_accurate_as_gather_cuda(case, dtype: torch.dtype) -> None:
    _assert_layer_as_accurate(case, dtype, device="cuda", autocast=dtype == torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "user_cnn"])
def test_cuda_matches_masked_dense(name: str) -> None:
    """fp32 on the GPU: features, BN statistics and every gradient as accurate as masked-dense's."""
    compare(name, _visible_patches, train=True, dtype=torch.float32, device="cuda", backend="triton")


def _visible_patches(grid: tuple[int, int]) -> torch.Tensor:
    return random_visible(2, grid, 0.6, seed=13)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_bf16_cuda_as_accurate_as_masked_dense_bf16(name: str) -> None:
    """Under bf16 autocast on the GPU the features are bf16 and as accurate as masked-dense in bf16."""
    import test_autocast as autocast_runs

    runs, pixels, encoder = autocast_runs._run(name, "cuda", "triton")
    sparse, ref_bf16, truth = runs["sparse"], runs["bf16"], runs["truth"]
    if name == "resnet18":  # ConvNeXt stages end in LayerNorm, which autocast runs in fp32
        assert torch.bfloat16 in {f.dtype for f in sparse[0]}
    for i, (a, b, t) in enumerate(zip(sparse[0], ref_bf16[0], truth[0])):
        hidden = ~pixels[:, :, :: encoder.feature_strides[i], :: encoder.feature_strides[i]]
        assert (a * hidden).abs().max() == 0, f"stage {i}: non-zero feature at a hidden site"
        assert_as_accurate(a, b, t, f"stage {i} features")
    assert_as_accurate(sparse[1], ref_bf16[1], truth[1], "input grad")
