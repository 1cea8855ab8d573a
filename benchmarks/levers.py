"""Interleaved A/B of ``sparkme.SparK``'s speed switches: one process, one model, variants alternated.

``python -m sparkme.benchmarks.levers --model resnet50 --rounds 5`` times the whole pretraining step
(forward, backward, LAMB) of each variant once per round, the variants in turn (the order reversed on
every other round), so each round compares steps taken seconds apart on a machine whose speed drifts.
It prints, per variant, the median time and the median over rounds of its ratio to the first variant.

Variants: ``default`` (every switch on), ``dense-densify`` (``densify_from_maps=False``: the encoder's
dense maps, visible rows read back by the mask), ``nchw`` (``channels_last=False``), ``neither``, and
``compiled`` (``torch.compile`` of the default model, compiled before the timed rounds) and
``official`` (the official SparK step as written, ``official.py``, on the masked-dense encoder:
``sparkme-bench``'s step baseline, here timed interleaved with the others).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

__all__ = ["VARIANTS", "main"]

VARIANTS: dict[str, dict[str, bool]] = {
    "default": {},
    "dense-densify": {"densify_from_maps": False},
    "nchw": {"channels_last": False},
    "neither": {"densify_from_maps": False, "channels_last": False},
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
        switches = {"densify_from_maps": True, "channels_last": True, **VARIANTS[name]}
        runner = runners[name] if runners.get(name) is not None else model
        step_optimizer = optimizers[name] if optimizers.get(name) is not None else optimizer

        def step() -> None:
            model.densify_from_maps, model.channels_last = switches["densify_from_maps"], switches["channels_last"]
            step_optimizer.zero_grad(set_to_none=True)
            if args.measure == "encoder":  # forward + backward of the encoder alone, as sparkme-bench's
                sum(f.mean() for f in runner.encoder(images, ~hidden[:, None])).backward()
                return
            loss, _, _ = runner(images, mask=hidden)
            loss.backward()
            step_optimizer.step()

        return step

    return {name: make(name) for name in args.variants}


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = _parse(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.threads:  # MinkowskiEngine's ops reset OpenMP's thread count unless OMP_NUM_THREADS is set
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
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
    first = args.variants[0]
    print(f"{args.model} {args.measure}, batch {args.batch}, {args.resolution} px, mask {args.mask_ratio}, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"| variant | ms (median) | vs {first} (median of per-round ratios) | per round ms |")
    print("|---|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(v / r for v, r in zip(values, times[first]))
        rounds = " / ".join(f"{v:.0f}" for v in values)
        print(f"| {name} | {statistics.median(values):.0f} | {ratio:.2f}x | {rounds} |")
    return times


if __name__ == "__main__":
    main()
