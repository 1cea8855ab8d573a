"""``python -m sparkme.cli.compare_probes``: pretrained vs random-init linear probes in one pass.

    python -m sparkme.cli.compare_probes --weights RUN/checkpoints/last.pth --seeds 0 1 2 --out probe.json

Prints one line per (init, features, BatchNorm re-calibration) setting and writes the JSON of
:func:`sparkme.finetune.compare.compare_probes` (the measurement in ``docs/export.md``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from sparkme.finetune.compare import compare_probes

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparkme.cli.compare_probes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=1500)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument(
        "--data-seed", type=int, default=1000, help="demo seed of the probe's training images (held-out: seed + 1)"
    )
    parser.add_argument("--out", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = compare_probes(
        args.weights, args.seeds, model_name=args.model, train_size=args.train_size, val_size=args.val_size,
        image_size=args.image_size, weight_decay=args.weight_decay, data_seed=args.data_seed,
    )  # fmt: skip
    for row in results["rows"]:
        print(
            f"{row['init']:10s} {row['features']:6s} recal={row['bn_recalibrate']!s:5s} "
            f"{row['top1_mean']:.1f} +- {row['top1_std']:.1f}  {row['top1']}"
        )
    print(results["seconds"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
