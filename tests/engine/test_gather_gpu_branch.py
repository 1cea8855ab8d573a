"""The gather backend's GPU allocation branch, forced on the CPU.

On the CPU the gather backend reuses scratch buffers per coordinate manager; on a GPU every scratch
take is a fresh allocation (CUDA's caching allocator). The rest of the backend (gathers, GEMMs, the
dense depthwise route that runs on cuDNN there) is the same code on both devices and is covered by
test_gather_backend.py. Here the CPU takes the GPU's branch: every case must give the float64 truth
and the same bits as the pooled run.
"""

from __future__ import annotations

import pytest
import test_gather_backend as layer
import torch

from sparkme.engine.backends import neighbours


def _run_case(case, monkeypatch, pooled: tuple[str, ...]):
    monkeypatch.setattr(neighbours.Scratch, "pooled_devices", pooled)
    made: list[neighbours.Scratch] = []
    original_init = neighbours.Scratch.__init__

    def recording_init(self) -> None:
        original_init(self)
        made.append(self)

    monkeypatch.setattr(neighbours.Scratch, "__init__", recording_init)
    _, _, _, kernel, stride, dilation, groups = case
    images, visible, weight, bias = layer._problem(case, torch.float64, bias=True)
    x, features, weight_s, bias_s, out = layer._gather_run(images, visible, weight, bias, stride, dilation, groups)
    grad = torch.randn(out.F.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.F.backward(grad)
    kept = sum(len(scratch._buffers) for scratch in made)
    return (out.F, features.grad, weight_s.grad, bias_s.grad), (images, visible, weight, bias, out, grad, x), kept


@pytest.mark.parametrize("case", layer.CASES, ids=[case[0] for case in layer.CASES])
def test_fresh_allocation_branch_gives_the_truth_and_the_pooled_bits(case, monkeypatch) -> None:
    gpu_branch, (images, visible, weight, bias, out, grad, x), kept = _run_case(case, monkeypatch, pooled=())
    assert kept == 0  # nothing pooled: the branch a CUDA tensor takes
    pooled, _, _ = _run_case(case, monkeypatch, pooled=("cpu",))
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), gpu_branch, pooled, strict=True):
        assert torch.equal(a, b), name
    truth = layer._dense_conv(images, visible, weight, bias, case, out.C.long(), grad)
    layer._check(gpu_branch[0], truth[0], truth[0], "output")
    layer._check(gpu_branch[1], layer._at_sites(truth[1], x.C, 1), layer._at_sites(truth[1], x.C, 1), "input grad")
    layer._check(gpu_branch[2], truth[2], truth[2], "weight grad")
    layer._check(gpu_branch[3], truth[3], truth[3], "bias grad")


@pytest.mark.parametrize("name", ["3x3/s2", "dw3x3/s2"])
def test_the_pooled_branch_is_what_the_cpu_takes(name, monkeypatch) -> None:
    """The switch is real: on the CPU these cases keep scratch buffers, on the forced GPU branch none."""
    case = next(case for case in layer.CASES if case[0] == name)
    assert _run_case(case, monkeypatch, pooled=("cpu",))[2] > 0
    assert _run_case(case, monkeypatch, pooled=())[2] == 0
