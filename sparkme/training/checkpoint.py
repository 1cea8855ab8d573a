"""Checkpoints: what a run saves (model, optimizer, RNG, dense-encoder safetensors) and the loaders.

A checkpoint ``X.pth`` is a ``torch.save`` dict (keys: ``model``, ``encoder``, ``model_cfg``,
``model_name``, ``spark_cfg``, ``config``, ``optimizer``, ``epoch``, ``step``, ``rng``,
``sparkme_version``); ``X.encoder.safetensors`` beside it holds the dense encoder with timm
keys. Every file is written atomically (:mod:`sparkme.atomic`), so a crash mid-write leaves the
previous file intact. The pair is
committed so that it never disagrees: the old safetensors goes first, then the new ``.pth``
and its safetensors are renamed in; a kill in between leaves a ``.pth`` without safetensors,
which :func:`restore_encoder_files` derives again from the ``.pth``.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparkme.atomic import atomic_write_bytes, sync_dir, write_temp
from sparkme.training.build import model_name_of, plain_config

__all__ = [
    "run_payload",
    "save_checkpoint",
    "load_checkpoint",
    "load_spark",
    "capture_rng",
    "restore_rng",
    "encoder_safetensors_path",
    "restore_encoder_files",
    "CheckpointError",
    "CheckpointWriteError",
]

REQUIRED_KEYS = ("model", "model_cfg", "spark_cfg", "step", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a sparkme checkpoint."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint (or a file derived from it) could not be written, e.g. the disk is full."""


def encoder_safetensors_path(path: str | os.PathLike[str]) -> Path:
    """``X.pth`` -> ``X.encoder.safetensors``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".pth") + ".encoder.safetensors")


def capture_rng() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and python, as tensors and plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states are restored when CUDA is available)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # interpolations that only resolve inside Hydra (e.g. ${hydra:...})
        return OmegaConf.to_yaml(cfg, resolve=False)


def run_payload(
    model: torch.nn.Module, cfg: Any, optimizer: torch.optim.Optimizer, step: int, steps_per_epoch: int
) -> dict[str, Any]:
    """What a pretraining run saves at ``step`` (the keys of the module docstring); ``cfg`` is its Hydra config."""
    import sparkme

    encoder = model.encoder
    model_cfg = plain_config(cfg.model)
    return {
        "model": model.state_dict(),
        "encoder": encoder.dense_state_dict() if hasattr(encoder, "dense_state_dict") else None,
        "model_cfg": model_cfg,
        "model_name": getattr(encoder, "model_name", None) or model_name_of(model_cfg),
        "spark_cfg": plain_config(cfg.spark),
        "backend": cfg.engine.get("backend"),
        "config": _config_yaml(cfg),
        "optimizer": optimizer.state_dict(),
        "epoch": step // steps_per_epoch,
        "step": step,
        "steps_per_epoch": steps_per_epoch,
        "rng": capture_rng(),
        "sparkme_version": sparkme.__version__,
    }


def _encoder_bytes(encoder: dict[str, torch.Tensor], model_name: str | None) -> bytes:
    from safetensors.torch import save as safetensors_bytes

    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in encoder.items()}
    return safetensors_bytes(tensors, metadata={"model_name": str(model_name or ""), "format": "timm"})


def commit_checkpoint(path: Path, checkpoint: bytes, encoder: bytes | None) -> None:
    """Move a serialized checkpoint and its encoder file into place without a moment of disagreement.

    Both are written to temporary files first (a full disk fails here, changing nothing); then the
    old safetensors is removed, the ``.pth`` renamed in, and the new safetensors last.
    """
    side = encoder_safetensors_path(path)
    temps = [write_temp(path, checkpoint)]
    try:
        if encoder is not None:
            temps.append(write_temp(side, encoder))
        if side.exists():
            side.unlink()
            sync_dir(path.parent)
        os.replace(temps[0], path)
        sync_dir(path.parent)
        if encoder is not None:
            os.replace(temps[1], side)
            sync_dir(path.parent)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def save_checkpoint(
    path: str | os.PathLike[str],
    payload: dict[str, Any],
    model_name: str | None = None,
    copies: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """Write ``payload`` to ``path`` (and to each of ``copies`` before it), each with its encoder safetensors.

    The copies go first so that ``path`` (the one a resume reads) is only ever newer than they are.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = payload.get("encoder")
    encoder_data = _encoder_bytes(encoder, model_name or payload.get("model_name")) if encoder is not None else None
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    for target in (*map(Path, copies), path):
        commit_checkpoint(target, data, encoder_data)
    return path


def restore_encoder_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Derive the missing ``X.encoder.safetensors`` of each ``X.pth`` in ``folder``; returns those written."""
    written = []
    for pth in sorted(Path(folder).glob("*.pth")):
        side = encoder_safetensors_path(pth)
        if side.exists():
            continue
        checkpoint = load_checkpoint(pth)
        if checkpoint.get("encoder") is not None:
            atomic_write_bytes(side, _encoder_bytes(checkpoint["encoder"], checkpoint.get("model_name")))
            written.append(side)
    return written


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a sparkme checkpoint; clear errors for a missing, truncated or foreign file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (expected a .pth written by sparkme-pretrain)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for damaged archives
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(error).__name__}: {error}); "
            "use another checkpoint (e.g. an every-N-epochs one beside last.pth)"
        ) from error
    missing = [key for key in REQUIRED_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not a sparkme checkpoint: missing keys {missing}")
    return checkpoint


def load_spark(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the SparK model of a checkpoint (dense model from ``model_cfg``, sparsified) and load it."""
    from sparkme.training.build import build_spark

    checkpoint = load_checkpoint(path, map_location=map_location)
    model = build_spark(checkpoint["model_cfg"], checkpoint["spark_cfg"], backend=checkpoint.get("backend"))
    model.load_state_dict(checkpoint["model"])
    return model.to(map_location)
