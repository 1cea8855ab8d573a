"""Pretrained vs random-init linear probes in one pass: last-stage and all-stage features, with and
without BatchNorm re-calibration (the measurement in ``docs/export.md``).

Eight ``sparkme-finetune --mode linear`` runs would compute the same trunk features many times;
this renders the demo images once and runs each trunk (the pretrained one, and one random init
per seed, seeded exactly as ``run_finetune`` seeds it) once per BatchNorm setting, taking the
last-stage features as the last block of the all-stage ones. Probe heads are trained with the
same ``train_linear_probe`` and seeds as the CLI. Command line: ``python -m sparkme.cli.compare_probes``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .batchnorm import recalibrate_batchnorm
from .data import demo_splits
from .model import build_classifier, resolve_model_name
from .probe import extract_features, train_linear_probe
from .run import _seed_everything

__all__ = ["compare_probes"]


def _materialise(dataset: Dataset, batch_size: int) -> TensorDataset:
    images, labels = zip(*DataLoader(dataset, batch_size=batch_size, shuffle=False), strict=True)
    return TensorDataset(torch.cat(images), torch.cat([torch.as_tensor(label) for label in labels]))


def _trunk_features(model: torch.nn.Module, train: Dataset, val: Dataset, batch_size: int) -> dict[bool, tuple]:
    """All-stage features of both splits without, then with, BatchNorm re-calibration."""
    out = {}
    for recalibrate in (False, True):
        if recalibrate:
            recalibrate_batchnorm(model, train, batch_size)
        out[recalibrate] = (
            extract_features(model, train, batch_size, "stages"),
            extract_features(model, val, batch_size, "stages"),
        )
    return out


def _probe_rows(
    trunks: dict[str, dict[int, dict[bool, tuple]]],
    seeds: Sequence[int],
    last_width: int,
    num_classes: int,
    probe: dict[str, Any],
) -> list[dict[str, Any]]:
    """One row per (init, features, recalibration): a linear probe per seed on the cached features."""
    rows = []
    for init, per_seed in trunks.items():
        for features in ("last", "stages"):
            for recalibrate in (False, True):
                top1 = []
                for seed in seeds:
                    (train_x, train_y), (val_x, val_y) = per_seed[seed][recalibrate]
                    if features == "last":  # the last stage is the last block of the all-stage features
                        train_x, val_x = train_x[:, -last_width:], val_x[:, -last_width:]
                    metrics = train_linear_probe((train_x, train_y), (val_x, val_y), num_classes, seed=seed, **probe)
                    top1.append(round(metrics["top1"], 2))
                rows.append(
                    {
                        "init": init,
                        "features": features,
                        "bn_recalibrate": recalibrate,
                        "top1": top1,
                        "top1_mean": statistics.fmean(top1),
                        "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                    }
                )
    return rows


def compare_probes(
    weights: str,
    seeds: Sequence[int],
    *,
    model_name: str | None = None,
    train_size: int = 1500,
    val_size: int = 500,
    image_size: int = 96,
    data_seed: int = 1000,
    epochs: int = 50,
    lr: float = 1e-2,
    weight_decay: float = 0.05,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Held-out top-1 per (init, features, recalibration) over ``seeds``; see the module docstring."""
    from sparkme.data.transforms import eval_transform

    model_name = resolve_model_name(weights, model_name)
    transform = eval_transform(image_size)
    splits = demo_splits(train_size, val_size, image_size, data_seed, transform, transform)
    train, val = _materialise(splits.train, batch_size), _materialise(splits.val, batch_size)
    seconds: dict[str, float] = {}
    trunks: dict[str, dict[int, dict[bool, tuple]]] = {"pretrained": {}, "random": {}}
    started = time.perf_counter()
    pretrained = _trunk_features(build_classifier(model_name, splits.num_classes, weights), train, val, batch_size)
    seconds["pretrained_trunk"] = round(time.perf_counter() - started, 1)
    for seed in seeds:
        started = time.perf_counter()
        trunks["pretrained"][seed] = pretrained
        _seed_everything(seed)
        model = build_classifier(model_name, splits.num_classes, None)
        trunks["random"][seed] = _trunk_features(model, train, val, batch_size)
        seconds[f"random_trunk_seed{seed}"] = round(time.perf_counter() - started, 1)
    probe = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size)
    rows = _probe_rows(trunks, seeds, model.num_features, splits.num_classes, probe)
    config = dict(weights=weights, model=model_name, seeds=list(seeds), train_size=train_size, val_size=val_size,
                  image_size=image_size, data_seed=data_seed, epochs=epochs, lr=lr, weight_decay=weight_decay,
                  batch_size=batch_size)  # fmt: skip
    return {"config": config, "rows": rows, "seconds": seconds}
