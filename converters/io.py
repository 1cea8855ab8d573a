"""Reading encoder weights (sparkme checkpoints, safetensors) and writing exports to disk."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from sparkme.atomic import atomic_write_bytes

from .base import Export

__all__ = ["read_encoder", "read_spark_source", "save_export"]


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, RuntimeError) as error:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file, truncated or damaged ({error})") from error
    return weights, metadata.get("model_name") or None


def read_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Dense encoder weights (timm keys) and the timm model name, when the file records it.

    Accepts a sparkme checkpoint (``encoder`` + ``model_name``), its ``*.encoder.safetensors``
    sibling (model name in the metadata), or a plain state dict (``.pth``/``.safetensors``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # sparkme checkpoints are weights-only safe
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a sparkme checkpoint or a state dict")
    if "encoder" in obj:
        return dict(obj["encoder"]), obj.get("model_name")
    if "model" in obj and not isinstance(obj["model"], torch.Tensor):
        raise ValueError(
            f"{path} has a 'model' entry but no 'encoder': re-save it with a current sparkme trainer "
            "or pass the dense encoder weights"
        )
    if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        return obj, None
    raise ValueError(f"{path} is neither a sparkme checkpoint (keys 'encoder', 'model_name') nor a state dict")


def read_spark_source(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None, dict[str, Any]]:
    """What ``--format spark`` exports: the whole SparK state dict of a sparkme checkpoint, else the encoder.

    Returns the state dict, the recorded model name and the options of ``to_spark`` the checkpoint
    records (``image_size``, ``mask_ratio``, ``sync_bn``, ``epoch``).
    """
    path = Path(path)
    if path.suffix != ".safetensors" and path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not a torch file: read_encoder below says why, in its own words
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "encoder" in obj:
            return dict(obj["model"]), obj.get("model_name"), _recorded_options(obj)
    state_dict, model_name = read_encoder(path)
    return state_dict, model_name, {}


def _recorded_options(checkpoint: dict[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    config = OmegaConf.create(checkpoint.get("config") or {})
    options: dict[str, Any] = {"epoch": checkpoint.get("epoch")}
    spark_cfg = checkpoint.get("spark_cfg") or {}
    if "mask_ratio" in spark_cfg:
        options["mask_ratio"] = float(spark_cfg["mask_ratio"])
    if OmegaConf.select(config, "data.image_size") is not None:
        options["image_size"] = int(OmegaConf.select(config, "data.image_size"))
    if OmegaConf.select(config, "train.sync_bn") is not None:
        options["sync_bn"] = bool(OmegaConf.select(config, "train.sync_bn"))
    return options


def save_export(export: Export, path: str | Path) -> Path:
    """Write ``export.payload`` in its format's file type; returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if export.format == "safetensors":
        from safetensors.torch import save

        metadata = {"model_name": export.model_name, "format": "timm", "source": "sparkme"}
        data = save(export.payload, metadata=metadata)
    elif export.format == "detectron2":
        data = pickle.dumps(export.payload)
    else:
        buffer = io.BytesIO()
        torch.save(export.payload, buffer)
        data = buffer.getvalue()
    atomic_write_bytes(path, data)  # an interrupted export never leaves a torn file behind
    return path
