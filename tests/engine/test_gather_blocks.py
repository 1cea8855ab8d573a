"""The gather-GEMM in blocks of output rows (bounded im2col scratch) gives the unblocked results.

``gather.BLOCK_BYTES`` sets the size of the gathered ``[rows, k*k*C]`` block on the CPU; here it is
forced down to the 16-row minimum, so every case of test_gather_backend.py runs in many blocks, and
its output and gradients must match the float64 truth (the masked dense conv) and the one-block run.
"""

from __future__ import annotations

import pytest
import test_gather_backend as layer
import torch

from sparkme.engine.backends import gather, neighbours

_GATHER_ROWS = neighbours.NeighbourPlan.gather_rows
GEMM_CASES = [case for case in layer.CASES if case[3] > 1 and not (case[6] > 1 and case[1] == case[6])]


def _run(case, monkeypatch, block_bytes: int | None):
    monkeypatch.setattr(gather, "BLOCK_BYTES", block_bytes)
    calls: list[int] = []

    def counting(self, padded, start, stop, reverse=False):
        calls.append(stop - start)
        return _GATHER_ROWS(self, padded, start, stop, reverse)

    monkeypatch.setattr(neighbours.NeighbourPlan, "gather_rows", counting)
    _, _, _, _, stride, dilation, groups = case
    images, visible, weight, bias = layer._problem(case, torch.float64, bias=True)
    x, features, weight_s, bias_s, out = layer._gather_run(images, visible, weight, bias, stride, dilation, groups)
    grad = torch.randn(out.F.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.F.backward(grad)
    results = (out.F.detach(), features.grad, weight_s.grad, bias_s.grad)
    return results, (images, visible, weight, bias, out, grad, x), calls


@pytest.mark.parametrize("case", GEMM_CASES, ids=[case[0] for case in GEMM_CASES])
def test_blocked_gather_gemm_gives_the_truth(case, monkeypatch) -> None:
    blocked, (images, visible, weight, bias, out, grad, x), calls = _run(case, monkeypatch, block_bytes=1)
    whole, _, whole_calls = _run(case, monkeypatch, block_bytes=None)
    assert max(calls) <= 16 and len(whole_calls) in (2, 3)  # one gather per pass when unblocked
    if out.F.shape[0] > 16:  # really in blocks, forward and backward
        assert len(calls) > 2 * len(whole_calls)
    truth = layer._dense_conv(images, visible, weight, bias, case, out.C.long(), grad)
    truth = (truth[0], layer._at_sites(truth[1], x.C, 1), truth[2], truth[3])
    for name, a, b, t in zip(("output", "input grad", "weight grad", "bias grad"), blocked, whole, truth, strict=True):
        layer._check(a, t, t, name)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
