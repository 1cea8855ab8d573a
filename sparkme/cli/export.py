"""``sparkme-export``: hand a SparK encoder's weights to timm, torchvision, detectron2 or mmdet.

    sparkme-export runs/demo/checkpoint.pth --format detectron2 --out r50_spark.pkl

Reads a sparkme checkpoint (or its ``*.encoder.safetensors`` sibling, or a plain dense
state dict with ``--model-name``), converts it with ``sparkme.converters`` and prints what
was dropped or unmapped plus the settings the consumer needs (with the written file's path).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from sparkme.converters import FORMATS, convert, read_encoder, save_export


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparkme-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="sparkme checkpoint .pth, *.encoder.safetensors, or a dense state dict")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="target format")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument(
        "--model-name", default=None, help="timm architecture (needed only when the file does not record it)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        state_dict, recorded_name = read_encoder(args.checkpoint)
        model_name = args.model_name or recorded_name
        if model_name is None:
            raise ValueError(f"{args.checkpoint} does not record its timm model name: pass --model-name")
        export = convert(state_dict, model_name, args.format)
    except (OSError, ValueError) as error:
        print(f"sparkme-export: error: {error}", file=sys.stderr)
        return 2
    path = save_export(export, args.out)
    print(re.sub(r"PATH\.[a-z]+", str(path), export.report()))  # the notes name the file just written
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
