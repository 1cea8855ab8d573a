"""Fine-tuning and linear probing of timm classifiers from SparK weights (``sparkme-finetune``).

from sparkme.finetune import FinetuneConfig, run_finetune
results = run_finetune(FinetuneConfig(weights="runs/demo/last.pth", mode="linear", seeds=[0, 1, 2]))
print(results["top1_mean"])
"""

from __future__ import annotations

from .batchnorm import recalibrate_batchnorm
from .data import LabelledSplits, demo_splits, folder_splits
from .model import build_classifier, pooled_features, resolve_model_name
from .probe import extract_features, train_linear_probe
from .run import FinetuneConfig, run_finetune
from .train import evaluate, finetune

__all__ = [
    "FinetuneConfig",
    "LabelledSplits",
    "build_classifier",
    "demo_splits",
    "evaluate",
    "extract_features",
    "finetune",
    "folder_splits",
    "pooled_features",
    "recalibrate_batchnorm",
    "resolve_model_name",
    "run_finetune",
    "train_linear_probe",
]
