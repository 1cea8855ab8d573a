"""The benchmark's GPU timing path, run on the CPU with a fake CUDA and a scripted clock.

On a GPU the step only queues kernels: a run is timed from a synchronize to the synchronize after
it, the warm-up runs are left out, and memory is CUDA's peak allocation since the reset.
"""

from __future__ import annotations

import pytest

from sparkme.benchmarks import measure
from sparkme.benchmarks.measure import Case, run_case


class FakeCuda:
    def __init__(self, events: list[str], peak_bytes: int) -> None:
        self.events, self.peak_bytes = events, peak_bytes

    def synchronize(self) -> None:
        self.events.append("sync")

    def reset_peak(self) -> None:
        self.events.append("reset")

    def max_allocated(self) -> int:
        self.events.append("peak")
        return self.peak_bytes


class ScriptedClock:
    """Wall time advances only inside the step (by the step's scripted duration); CPU time by a tenth."""

    def __init__(self, events: list[str]) -> None:
        self.events, self.now = events, 0.0

    def wall(self) -> float:
        self.events.append("wall")
        return self.now

    def cpu(self) -> float:
        return self.now / 10


CASE = Case(
    model="resnet18", path="dense", measure="encoder", batch=4, resolution=64, mask_ratio=0.6, warmup=2, iters=3
)


def test_gpu_runs_are_timed_between_synchronizes_without_warmup(monkeypatch):
    events: list[str] = []
    clock = ScriptedClock(events)
    durations = iter([9.0, 8.0, 0.5, 0.3, 0.4])  # two slow warm-ups, then the timed runs

    def step() -> None:
        events.append("step")
        clock.now += next(durations)

    monkeypatch.setattr(measure, "_build_step", lambda case, device: step)
    row = run_case(CASE, clock=clock, cuda=FakeCuda(events, peak_bytes=3 * 2**30))

    warmup = ["sync", "wall", "step", "sync"]
    timed = [*warmup, "wall"]  # the clock stops only after the synchronize that follows the step
    assert events == ["sync", "reset", *warmup, *warmup, *timed, *timed, *timed, "peak"]
    assert row["ms_all"] == pytest.approx([500.0, 300.0, 400.0])
    assert row["ms"] == pytest.approx(400.0)
    assert row["cpu_ms"] == pytest.approx(40.0)
    assert row["images_per_s"] == pytest.approx(4 / 0.4)
    assert row["peak_mib"] == pytest.approx(3 * 1024)
    assert row["memory_method"] == "cuda max_memory_allocated"


def test_gpu_path_runs_a_real_case_on_the_cpu():
    events: list[str] = []
    case = Case(
        model="resnet18",
        path="sparse-gather",
        measure="step",
        batch=1,
        resolution=64,
        mask_ratio=0.6,
        warmup=0,
        iters=1,
        decoder_width=32,
    )
    row = run_case(case, cuda=FakeCuda(events, peak_bytes=2**20))
    assert row["error"] is None and row["ms"] > 0
    assert row["peak_mib"] == 1.0 and events == ["sync", "reset", "sync", "sync", "peak"]


def test_cpu_runs_never_touch_cuda(monkeypatch):
    monkeypatch.setattr(measure, "CudaCalls", None)  # constructing it would fail
    monkeypatch.setattr(measure, "_build_step", lambda case, device: lambda: None)
    row = run_case(CASE)
    assert row["memory_method"].startswith("cpu")


@pytest.mark.gpu
def test_a_real_gpu_case_reports_cuda_memory():
    case = Case(
        model="resnet18", path="sparse-gather-bf16", measure="step", batch=2, resolution=64, mask_ratio=0.6,
        device="cuda", warmup=1, iters=2, decoder_width=32,
    )  # fmt: skip
    row = run_case(case)
    assert row["error"] is None and row["ms"] > 0 and len(row["ms_all"]) == 2
    assert row["memory_method"] == "cuda max_memory_allocated" and row["peak_mib"] > 0
