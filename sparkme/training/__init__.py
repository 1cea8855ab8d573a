"""Pretraining as a library: the loop (``Trainer``), schedules, optimizer groups, checkpoints.

``sparkme-pretrain`` (``sparkme.cli.pretrain``) is a thin Hydra layer over ``Trainer``;
``load_spark`` / ``load_checkpoint`` read what a run wrote.
"""

from sparkme.training.checkpoint import CheckpointError, load_checkpoint, load_spark, save_checkpoint
from sparkme.training.schedule import CosineSchedule
from sparkme.training.trainer import DivergenceError, NonFiniteLossError, Trainer, TrainResult

__all__ = [
    "CheckpointError",
    "CosineSchedule",
    "DivergenceError",
    "NonFiniteLossError",
    "Trainer",
    "TrainResult",
    "load_checkpoint",
    "load_spark",
    "save_checkpoint",
]
