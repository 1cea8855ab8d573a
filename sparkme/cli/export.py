"""``sparkme-export``: hand a SparK encoder's weights to timm, torchvision, detectron2 or mmdet.

    sparkme-export runs/demo/checkpoint.pth --format detectron2 --out r50_spark.pkl

Reads a sparkme checkpoint (or its ``*.encoder.safetensors`` sibling, or a plain dense
state dict with ``--model-name``), converts it with ``sparkme.converters`` and prints what
was dropped or unmapped plus the settings the consumer needs (with the written file's path).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from sparkme.cli.errors import UserError, user_errors
from sparkme.converters import FORMATS, convert, read_encoder, read_spark_source, save_export

# Suffixes a consumer reads as the export's file type (timm and detectron2 pick their loader by suffix).
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparkme-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="sparkme checkpoint .pth, *.encoder.safetensors, or a dense state dict")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="target format")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument(
        "--model-name", default=None, help="timm architecture (needed only when the file does not record it)"
    )
    return parser


def _check_out(out: Path, format: str, suffix: str, model_name: str) -> None:
    """``--out`` must name a file (not a folder) whose suffix tells the consumer the export's file type."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the file to write, e.g. --out {out / model_name}_spark{suffix}")
    accepted = _TORCH_SUFFIXES if suffix in _TORCH_SUFFIXES else (suffix,)
    if out.suffix not in accepted:
        raise UserError(
            f"--format {format} writes a {suffix} file but --out {out} ends in {out.suffix or 'no suffix'}; "
            f"use --out {out.with_suffix(suffix)}"
        )


@user_errors("sparkme-export")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.format == "spark":  # the whole SparK model (decoder, densify, mask tokens) when recorded
        state_dict, recorded_name, options = read_spark_source(args.checkpoint)
    else:
        (state_dict, recorded_name), options = read_encoder(args.checkpoint), {}
    model_name = args.model_name or recorded_name
    if model_name is None:
        raise UserError(
            f"{args.checkpoint} does not record a timm model name: pass --model-name if its encoder is a timm "
            "model; a model of your own (a custom CNN, ResNet3d) needs no export: the *.encoder.safetensors "
            "beside each checkpoint holds its dense weights, keyed like its state_dict()"
        )
    export = convert(state_dict, model_name, args.format, **options)
    _check_out(Path(args.out), args.format, export.suffix, model_name)
    path = save_export(export, args.out)
    print(re.sub(r"PATH\.[a-z]+", str(path), export.report()))  # the notes name the file just written
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
