"""Weight converters: a SparK encoder's dense weights -> the formats downstream tools load.

``spark`` writes the official SparK "with decoder" checkpoint (``spark_format``; it also reads
official checkpoints back for ``sparkme-pretrain init_from=PATH``).

Installed as ``sparkme.converters``. One pure function per format, each taking a dense
state dict with timm keys and the timm model name and returning an ``Export`` (weights,
payload to write, dropped/unmapped keys, notes for the consumer)::

    from sparkme.converters import convert, save_export
    export = convert(encoder_state_dict, "resnet50", "detectron2")
    print(export.report())
    save_export(export, "r50_spark.pkl")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .base import Export, UnsupportedArchitectureError
from .detectron2_format import to_detectron2
from .io import read_encoder, read_spark_source, save_export
from .mmdet_format import to_mmdet
from .spark_format import to_spark
from .timm_format import to_safetensors, to_timm
from .torchvision_format import to_torchvision

__all__ = [
    "FORMATS",
    "Export",
    "UnsupportedArchitectureError",
    "convert",
    "read_encoder",
    "read_spark_source",
    "save_export",
]

FORMATS: dict[str, Callable[..., Export]] = {
    "timm": to_timm,
    "safetensors": to_safetensors,
    "torchvision": to_torchvision,
    "detectron2": to_detectron2,
    "mmdet": to_mmdet,
    "spark": to_spark,
}


def convert(state_dict: Mapping[str, Any], model_name: str, format: str, **options: Any) -> Export:
    """Convert a dense timm-keyed encoder state dict to ``format`` (one of ``FORMATS``)."""
    converter = FORMATS.get(format)
    if converter is None:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    return converter(state_dict, model_name, **options)
