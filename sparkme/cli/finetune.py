"""``sparkme-finetune``: linear-probe or fine-tune a timm classifier from SparK weights.

# probe SparK weights and the random-init baseline on the demo labels, 3 seeds each
sparkme-finetune --weights runs/demo/last.pth --mode linear --seeds 0 1 2 --out probe_spark.json
sparkme-finetune --model resnet18 --mode linear --seeds 0 1 2 --out probe_random.json
# fine-tune on your own folder of class subfolders
sparkme-finetune --weights r50.safetensors --data /data/flowers --mode finetune --layer-decay 0.75 --mixup
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sparkme.cli.errors import user_errors
from sparkme.finetune import FinetuneConfig, run_finetune


def build_parser() -> argparse.ArgumentParser:
    defaults = FinetuneConfig()
    parser = argparse.ArgumentParser(
        prog="sparkme-finetune",
        description="Linear-probe or fine-tune a timm classifier from SparK weights; reports held-out top-1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--weights", help="sparkme checkpoint, *.encoder.safetensors or sparkme-export timm file; omit for random init"
    )
    parser.add_argument("--model", help="timm architecture (read from --weights when recorded there)")
    parser.add_argument("--mode", choices=["linear", "finetune"], default=defaults.mode)
    parser.add_argument(
        "--features",
        choices=["last", "stages"],
        default=defaults.features,
        help="linear probe input: the classifier's pooled features, or all pooled stride>=4 stages concatenated",
    )
    parser.add_argument(
        "--no-bn-recalibrate",
        dest="bn_recalibrate",
        action="store_false",
        help="linear probe: keep the weights' BatchNorm running statistics instead of re-estimating them "
        "on the probe's full training images (default: re-estimate, for pretrained and random init alike)",
    )
    parser.add_argument("--data", default=defaults.data, help="'demo' or a folder of class subfolders")
    parser.add_argument("--train-size", type=int, default=defaults.train_size, help="demo training images")
    parser.add_argument("--val-size", type=int, default=defaults.val_size, help="demo held-out images")
    parser.add_argument(
        "--data-seed",
        type=int,
        default=defaults.data_seed,
        help="demo image seed (held-out uses +1) / folder split seed",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="held-out share of a folder without train/ and val/",
    )
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=None, help="default 1e-2 (linear) / 1e-3 (finetune)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (finetune), e.g. 0.75")
    parser.add_argument("--warmup-epochs", type=int, default=defaults.warmup_epochs, help="finetune warmup")
    parser.add_argument("--mixup", action="store_true", help="timm Mixup/CutMix + label smoothing (finetune)")
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


@user_errors("sparkme-finetune", also=(FloatingPointError,))  # a diverging run says "lower --lr"
def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    out = args.pop("out")
    results = run_finetune(FinetuneConfig(**args), out=out)
    source = args["weights"] or "random init"
    for run in results["runs"]:
        print(f"seed {run['seed']}: top-1 {run['top1']:.2f}%  ({run['seconds']} s)")
    print(
        f"{results['model']} {args['mode']} from {source}: held-out top-1 "
        f"{results['top1_mean']:.2f} +- {results['top1_std']:.2f}% over {len(results['runs'])} seed(s), "
        f"{results['val_images']} held-out images"
    )
    if out:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
