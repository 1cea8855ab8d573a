"""One fine-tune / linear-probe experiment over several seeds, as a plain config -> results dict."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batchnorm import recalibrate_batchnorm
from .data import LabelledSplits, demo_splits, folder_splits
from .model import build_classifier, resolve_model_name
from .probe import extract_features, train_linear_probe
from .train import finetune

__all__ = ["FinetuneConfig", "run_finetune"]


@dataclass
class FinetuneConfig:
    """Everything one run needs; the CLI fills it from flags (see ``sparkme-finetune --help``)."""

    weights: str | None = None  # sparkme checkpoint / exported timm file; None = random init
    model: str | None = None  # timm architecture; read from the weights when they record it
    mode: str = "linear"  # "linear" (frozen trunk) or "finetune" (all parameters)
    features: str = "last"  # linear only: "last" (classifier input) or "stages" (all pooled stages)
    bn_recalibrate: bool = True  # linear only: re-estimate BatchNorm statistics on the probe's train images
    data: str = "demo"  # "demo" or a folder of class subfolders
    train_size: int = 600  # demo only
    val_size: int = 300  # demo only
    data_seed: int = 1000  # demo: train images from this seed, held-out ones from data_seed + 1
    val_fraction: float = 0.2  # folder without train/ and val/: held-out share (fixed split)
    image_size: int = 64
    epochs: int = 50
    lr: float | None = None  # default: 1e-2 linear, 1e-3 finetune
    batch_size: int = 64
    weight_decay: float = 0.0
    layer_decay: float | None = None  # finetune only, e.g. 0.75
    warmup_epochs: int = 1  # finetune only
    mixup: bool = False  # finetune only
    seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        if self.mode not in ("linear", "finetune"):
            raise ValueError(f"mode must be 'linear' or 'finetune', got {self.mode!r}")
        if self.mode == "linear" and (self.mixup or self.layer_decay is not None):
            raise ValueError("--mixup and --layer-decay apply to --mode finetune only")
        if self.mode == "finetune" and not self.bn_recalibrate:
            raise ValueError("--no-bn-recalibrate applies to --mode linear only (fine-tuning trains BatchNorm)")
        if self.features not in ("last", "stages") or (self.mode == "finetune" and self.features != "last"):
            raise ValueError(f"--features must be 'last' or 'stages' (linear mode only), got {self.features!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.seeds:
            raise ValueError("epochs and batch size must be >= 1 and at least one seed is needed")
        if self.lr is None:
            self.lr = 1e-2 if self.mode == "linear" else 1e-3


def _splits(cfg: FinetuneConfig) -> LabelledSplits:
    from sparkme.data.transforms import eval_transform, pretrain_transform

    val_transform = eval_transform(cfg.image_size)
    train_transform = val_transform if cfg.mode == "linear" else pretrain_transform(cfg.image_size)
    if cfg.data == "demo":
        return demo_splits(cfg.train_size, cfg.val_size, cfg.image_size, cfg.data_seed, train_transform, val_transform)
    return folder_splits(cfg.data, cfg.val_fraction, cfg.data_seed, train_transform, val_transform)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _linear_metrics(
    cfg: FinetuneConfig, model: torch.nn.Module, splits: LabelledSplits, seed: int, cached: tuple | None
) -> tuple[dict[str, float], tuple | None]:
    """A linear probe on the trunk's features; returns its metrics and the features to reuse (a
    frozen pretrained trunk gives the same features for every seed; a random init does not)."""
    if cached is None:
        if cfg.bn_recalibrate:
            recalibrate_batchnorm(model, splits.train, cfg.batch_size)
        features = extract_features(model, splits.train, cfg.batch_size, cfg.features)
        val_features = extract_features(model, splits.val, cfg.batch_size, cfg.features)
        cached = (features, val_features) if cfg.weights is not None else None
    else:
        features, val_features = cached
    metrics = train_linear_probe(
        features,
        val_features,
        splits.num_classes,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        seed=seed,
    )
    return metrics, cached


def _finetune_metrics(cfg: FinetuneConfig, model: torch.nn.Module, splits: LabelledSplits, seed: int) -> dict:
    return finetune(
        model,
        splits.train,
        splits.val,
        splits.num_classes,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        batch_size=cfg.batch_size,
        mixup=cfg.mixup,
        warmup_epochs=cfg.warmup_epochs,
        seed=seed,
    )


def run_finetune(cfg: FinetuneConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Run every seed; returns (and writes to ``out`` as JSON) per-seed and mean/std top-1.

    The seed sets the random init of the trunk (baseline) or head and the data order; the
    held-out split is the same for every seed. In linear mode with ``bn_recalibrate`` the
    trunk's BatchNorm statistics (pretrained or random init alike) are re-estimated on the
    training split before the features are computed (see ``recalibrate_batchnorm``).
    """
    model_name = resolve_model_name(cfg.weights, cfg.model)
    splits = _splits(cfg)
    runs = []
    cached: tuple | None = None
    for seed in cfg.seeds:
        started = time.perf_counter()
        _seed_everything(seed)
        model = build_classifier(model_name, splits.num_classes, cfg.weights)
        if cfg.mode == "linear":
            metrics, cached = _linear_metrics(cfg, model, splits, seed, cached)
        else:
            metrics = _finetune_metrics(cfg, model, splits, seed)
        runs.append({"seed": seed, **metrics, "seconds": round(time.perf_counter() - started, 1)})
    top1 = [run["top1"] for run in runs]
    results = {
        "config": asdict(cfg),
        "model": model_name,
        "classes": splits.classes,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "runs": runs,
        "top1_mean": statistics.fmean(top1),
        "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
    }
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    return results
