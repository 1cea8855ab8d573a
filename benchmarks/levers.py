"""Interleaved A/B of ``sparkme.SparK``'s speed switches: one process, one model, variants alternated.

``python -m sparkme.benchmarks.levers --model resnet50 --rounds 5`` times the whole pretraining step
(forward, backward, LAMB) of each variant once per round, the variants in turn (the order reversed on
every other round), so each round compares steps taken seconds apart on a machine whose speed drifts.
It prints, per variant, the median time and the median over rounds of its ratio to the first variant.

Variants: ``default`` (every switch on), ``dense-densify`` (``densify_from_maps=False``: the encoder's
dense maps, visible rows read back by the mask), ``nchw`` (``channels_last=False``), ``neither``,
``unblocked`` (the gather backend's GEMMs on the whole ``[N, k*k*C]`` im2col matrix instead of blocks of
output rows, ``gather.BLOCK_BYTES = None``), ``compiled`` (``torch.compile`` of the default model,
compiled before the timed rounds: the projections, decoder and loss; the sparse encoder and densify stay
eager) and ``official`` (the official SparK step as written, ``official.py``, on the masked-dense
encoder: ``sparkme-bench``'s step baseline, here timed interleaved with the others).

``--memory`` adds each variant's peak memory: one step (the warm-up) in a fresh process, peak RSS
above the RSS before it (as ``sparkme-bench`` measures it on the CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

__all__ = ["VARIANTS", "main"]

VARIANTS: dict[str, dict[str, bool]] = {
    "default": {},
    "dense-densify": {"densify_from_maps": False},
    "nchw": {"channels_last": False},
    "neither": {"densify_from_maps": False, "channels_last": False},
    "unblocked": {"blocked_gemm": False},
    "compiled": {},
    "official": {},
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--decoder-width", type=int, default=768)
    parser.add_argument("--measure", choices=["step", "encoder"], default="step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["default", "dense-densify", "nchw", "neither"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="also each variant's peak RSS, in a fresh process")
    parser.add_argument("--peak-only", action="store_true", help=argparse.SUPPRESS)  # the --memory child
    return parser.parse_args(argv)


def _official(args: argparse.Namespace) -> torch.nn.Module:
    from sparkme.benchmarks.official import OfficialSparK
    from sparkme.benchmarks.paths import build_encoder, get_path

    torch.manual_seed(0)
    encoder = build_encoder(get_path("masked-dense"), args.model)
    return OfficialSparK(encoder, mask_ratio=args.mask_ratio, decoder_width=args.decoder_width).train()


def _param_groups(model: torch.nn.Module) -> list[dict]:
    from sparkme.method.spark import split_weight_decay

    decay, plain = split_weight_decay(model)
    return [{"params": decay, "weight_decay": 0.04}, {"params": plain, "weight_decay": 0.0}]


def _steps(args: argparse.Namespace):
    """One step callable per variant, all on the same model, optimizer, images and mask."""
    import timm
    from timm.optim import Lamb

    import sparkme
    from sparkme.benchmarks.measure import Case, _inputs
    from sparkme.engine.backends import gather

    block_bytes = gather.BLOCK_BYTES

    torch.manual_seed(0)
    encoder = sparkme.sparsify(timm.create_model(args.model, pretrained=False), backend="gather")
    model = sparkme.SparK(encoder, mask_ratio=args.mask_ratio, decoder_width=args.decoder_width).train()
    case = Case(args.model, "sparse-gather", "step", args.batch, args.resolution, args.mask_ratio)
    images, hidden = _inputs(case, encoder.downsample_ratio, torch.device("cpu"))
    optimizer = Lamb(model.param_groups(0.04), lr=2e-4 * args.batch / 256)
    runners = {"compiled": torch.compile(model) if "compiled" in args.variants else None}
    optimizers = {"official": None}
    if "official" in args.variants:
        runners["official"] = _official(args)
        optimizers["official"] = Lamb(_param_groups(runners["official"]), lr=2e-4 * args.batch / 256)

    def make(name: str):
        switches = {"densify_from_maps": True, "channels_last": True, "blocked_gemm": True, **VARIANTS[name]}
        runner = runners[name] if runners.get(name) is not None else model
        step_optimizer = optimizers[name] if optimizers.get(name) is not None else optimizer

        def step() -> None:
            model.densify_from_maps, model.channels_last = switches["densify_from_maps"], switches["channels_last"]
            gather.BLOCK_BYTES = block_bytes if switches["blocked_gemm"] else None
            step_optimizer.zero_grad(set_to_none=True)
            if args.measure == "encoder":  # forward + backward of the encoder alone, as sparkme-bench's
                sum(f.mean() for f in runner.encoder(images, ~hidden[:, None])).backward()
                return
            loss, _, _ = runner(images, mask=hidden)
            loss.backward()
            step_optimizer.step()

        return step

    return {name: make(name) for name in args.variants}


def _peak_mib(args: argparse.Namespace, name: str) -> float:
    """``name``'s peak memory over one step, in a fresh process (RSS never shrinks back between variants)."""
    argv = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in ("model", "batch", "resolution")]
    argv += [f"--mask-ratio={args.mask_ratio}", f"--decoder-width={args.decoder_width}", f"--measure={args.measure}"]
    argv += [f"--threads={args.threads}"] if args.threads else []
    command = [sys.executable, "-m", "sparkme.benchmarks.levers", *argv, "--variants", name, "--peak-only"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1].split("=")[1])


def _peak_only(args: argparse.Namespace) -> None:
    from sparkme.benchmarks.measure import _PeakMemory

    (step,) = _steps(args).values()
    memory = _PeakMemory(None)
    memory.start()
    step()
    print(f"peak_mib={memory.peak_mib():.1f}")


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = _parse(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.threads:  # and OMP_NUM_THREADS, for the libraries that read it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    if args.peak_only:
        _peak_only(args)
        return {}
    steps = _steps(args)
    for step in steps.values():  # warm-up (and compilation) outside the timed rounds
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1000)
    peaks = {name: _peak_mib(args, name) for name in steps} if args.memory else {}
    _report(args, times, peaks)
    return times


def _report(args: argparse.Namespace, times: dict[str, list[float]], peaks: dict[str, float]) -> None:
    first = args.variants[0]
    print(f"{args.model} {args.measure}, batch {args.batch}, {args.resolution} px, mask {args.mask_ratio}, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads")  # fmt: skip
    memory = " peak MiB (one step, fresh process) |" if peaks else ""
    print(f"| variant | ms (median) | vs {first} (median of per-round ratios) | per round ms |{memory}")
    print("|---|---|---|---|" + ("---|" if peaks else ""))
    for name, values in times.items():
        ratio = statistics.median(v / r for v, r in zip(values, times[first]))
        rounds = " / ".join(f"{v:.0f}" for v in values)
        peak = f" {peaks[name]:.0f} ({peaks[name] / peaks[first]:.2f}x) |" if peaks else ""
        print(f"| {name} | {statistics.median(values):.0f} | {ratio:.2f}x | {rounds} |{peak}")


if __name__ == "__main__":
    main()
