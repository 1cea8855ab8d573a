"""Time and memory of one benchmark case: one model, one path, one measure, one size.

``encoder``: encoder forward + backward (a scalar of all feature maps). ``step``: the full
pretraining step (encoder + densify + decoder + loss + backward + LAMB step): ``sparkme.SparK`` on
the sparse paths, the official SparK step as written (``official.py``) on the masked-dense and dense ones.
Every path sees the same seeded images and patch mask; a volume model (``paths.VOLUME_MODELS``) gets
1-channel ``resolution``-sided cubes and a cube mask, and only the ``encoder`` measure on a
non-sparse path (the official step in ``official.py`` is 2D). Time is the median of ``iters`` runs after
``warmup`` runs (wall clock, and this process's CPU time summed over threads, which other
processes on a shared machine disturb less); memory is CUDA's max allocated, or on the CPU the
peak resident set above the level just before the first run (honest only in a fresh process:
``isolate`` in the CLI).

The clock and the CUDA calls (synchronize around each timed run, peak-memory reset and read) are
injectable (``run_case(case, clock=..., cuda=...)``): the CPU tests drive the GPU timing path
with a fake CUDA and a scripted clock.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from sparkme.benchmarks.paths import Path, build_encoder, channels_last_format, get_path, is_volume_model

__all__ = ["Case", "run_case", "check_measure", "MEASURES", "Clock", "CudaOps", "CudaCalls"]

MEASURES = ("encoder", "step")


@dataclass(frozen=True)
class Case:
    model: str
    path: str
    measure: str
    batch: int
    resolution: int
    mask_ratio: float
    device: str = "cpu"
    warmup: int = 1
    iters: int = 3
    seed: int = 0
    decoder_width: int = 768
    threads: int | None = None


def check_measure(model: str, measure: str, path_name: str) -> None:
    """Refuse, before anything runs, a measure this model and path cannot take."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose from {list(MEASURES)}")
    if measure == "step" and is_volume_model(model) and get_path(path_name).kind != "sparse":
        raise ValueError(
            f"measure 'step' on the volume model {model} with path {path_name}: the official-step baseline "
            "(sparkme.benchmarks.official) is 2D only; use measures=[encoder] (or sparse paths only)"
        )


def _inputs(
    case: Case, patch: int, device: torch.device, spatial_dims: int = 2, in_channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded inputs ``[B, C, *sides]`` (square images or cubic volumes) and the hidden mask ``[B, *grid]``."""
    from sparkme.method.masking import random_grid_mask

    if case.resolution % patch:
        raise ValueError(f"resolution {case.resolution} is not a multiple of {case.model}'s patch size {patch}")
    generator = torch.Generator().manual_seed(case.seed)
    images = torch.randn(case.batch, in_channels, *(case.resolution,) * spatial_dims, generator=generator)
    grid = (case.resolution // patch,) * spatial_dims
    hidden = random_grid_mask(case.batch, grid, case.mask_ratio, generator=generator)
    return images.to(device), hidden.to(device)


class Clock:
    """Wall-clock and process-CPU seconds (``time.perf_counter`` / ``time.process_time``)."""

    def wall(self) -> float:
        return time.perf_counter()

    def cpu(self) -> float:
        return time.process_time()


class CudaOps(Protocol):
    """The CUDA calls a GPU case makes: wait for queued kernels, reset and read the peak allocation."""

    def synchronize(self) -> None: ...

    def reset_peak(self) -> None: ...

    def max_allocated(self) -> int: ...


class CudaCalls:
    """``CudaOps`` on a real device through ``torch.cuda``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def max_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


class _PeakMemory:
    """Peak memory over a region: CUDA max allocated, or CPU peak RSS (VmHWM) above the starting RSS."""

    def __init__(self, cuda: CudaOps | None) -> None:
        self.cuda = cuda
        self.method = "cuda max_memory_allocated"
        self._start = 0

    def start(self) -> None:
        if self.cuda is not None:
            self.cuda.synchronize()
            self.cuda.reset_peak()
            return
        self._start = _status_kib("VmRSS")
        try:  # "5" resets the peak RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.method = "cpu peak RSS (VmHWM) minus RSS before the runs"
        except OSError:
            self.method = "cpu ru_maxrss minus RSS before the runs (peak may predate the runs)"

    def peak_mib(self) -> float:
        if self.cuda is not None:
            return self.cuda.max_allocated() / 2**20
        peak = _status_kib("VmHWM") if "VmHWM" in self.method else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak - self._start, 0) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _pretraining_model(path: Path, encoder: torch.nn.Module, case: Case) -> torch.nn.Module:
    """``sparkme.SparK`` around a sparse encoder; the official SparK step as written around the others."""
    if path.kind == "sparse":
        import sparkme

        return sparkme.SparK(encoder, mask_ratio=case.mask_ratio, decoder_width=case.decoder_width)
    from sparkme.benchmarks.official import OfficialSparK

    return OfficialSparK(encoder, mask_ratio=case.mask_ratio, decoder_width=case.decoder_width)


def _build_step(case: Case, device: torch.device):
    """The callable one timed iteration runs, plus what the caller needs to know."""
    check_measure(case.model, case.measure, case.path)
    path = get_path(case.path)
    torch.manual_seed(case.seed)
    encoder = build_encoder(path, case.model).to(device).train()
    dims = encoder.spatial_dims
    images, hidden = _inputs(case, encoder.downsample_ratio, device, dims, encoder.in_channels)
    if path.channels_last:
        images = images.contiguous(memory_format=channels_last_format(dims))
    visible = ~hidden[:, None]
    if case.measure == "encoder":
        params = [p for p in encoder.parameters() if p.requires_grad]

        def step() -> None:
            for param in params:
                param.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=path.bf16):
                features = encoder(images, visible)
                loss = sum(feature.float().mean() for feature in features)
            loss.backward()

        return step
    from timm.optim import Lamb

    from sparkme.method.spark import split_weight_decay

    model = _pretraining_model(path, encoder, case).to(device).train()
    if path.channels_last:
        model = model.to(memory_format=channels_last_format(dims))
    decay, plain = split_weight_decay(model)
    groups = [{"params": decay, "weight_decay": 0.04}, {"params": plain, "weight_decay": 0.0}]
    optimizer = Lamb(groups, lr=2e-4 * case.batch / 256)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=path.bf16):
            loss, _, _ = model(images, mask=hidden)
        loss.backward()
        optimizer.step()

    return step


def run_case(case: Case, *, clock: Clock | None = None, cuda: CudaOps | None = None) -> dict:
    """Run ``case`` in this process and return its result row.

    ``clock`` and ``cuda`` default to the real ones (``cuda`` only for a CUDA device); passing a
    ``cuda`` for a CPU case runs the GPU timing path (synchronize around every run, CUDA's peak
    allocation as memory) with the CPU doing the work.
    """
    if case.threads:
        torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device; run with device=cpu")
    if case.warmup < 0 or case.iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1 (got warmup={case.warmup}, iters={case.iters})")
    clock = clock or Clock()
    if cuda is None and device.type == "cuda":
        cuda = CudaCalls(device)
    step = _build_step(case, device)
    memory = _PeakMemory(cuda)
    memory.start()
    times, cpu_times = [], []
    for i in range(case.warmup + case.iters):
        if cuda is not None:
            cuda.synchronize()  # queued work of the previous run is not timed again
        start, cpu_start = clock.wall(), clock.cpu()
        step()
        if cuda is not None:
            cuda.synchronize()  # the kernels this run queued are finished before the clock stops
        if i >= case.warmup:
            times.append(clock.wall() - start)
            cpu_times.append(clock.cpu() - cpu_start)
    seconds = statistics.median(times)
    return {
        **asdict(case),
        "threads": torch.get_num_threads(),
        "ms": seconds * 1000,
        "ms_all": [t * 1000 for t in times],
        "cpu_ms": statistics.median(cpu_times) * 1000,  # this process's CPU time, all threads: less load-sensitive
        "images_per_s": case.batch / seconds,
        "peak_mib": memory.peak_mib(),
        "memory_method": memory.method,
        "error": None,
    }
