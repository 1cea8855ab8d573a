"""Run logging sinks: JSON-lines metrics and TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger"]


class MetricsLogger:
    """Writes each record to ``logs/metrics.jsonl`` and its numbers to TensorBoard, as configured."""

    def __init__(self, log_dir: Path | None, tensorboard: bool = True, jsonl: bool = True) -> None:
        self._jsonl = None
        self._tb = None
        if log_dir is None:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(log_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(log_dir / "tensorboard"))

    def log(self, record: dict[str, Any], step: int, prefix: str = "train") -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"time": round(time.time(), 3), "kind": prefix, **record}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("step", "epoch"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
