"""What one ``fit`` call has seen: losses, timing, the progress bar, the metrics records, and the
closing lines (including the one that says a signal stopped the run and how to resume)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparkme.training.metrics import MetricsLogger

__all__ = ["RunProgress", "TrainResult"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or stopped) run did."""

    steps: int
    epochs_done: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    run_dir: Path
    last_checkpoint: Path | None
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    stopped_by: str | None = None  # the signal (SIGTERM, SIGINT) that stopped the run early, if any


class RunProgress:
    """Per-step records to ``metrics`` (every ``log_every`` steps) and a tqdm bar (when ``show_bar``)."""

    def __init__(
        self, metrics: MetricsLogger, total: int, initial: int, images_per_step: int, log_every: int, show_bar: bool
    ) -> None:
        from tqdm import tqdm

        self.metrics, self.total, self.images_per_step = metrics, total, images_per_step
        self.log_every = max(1, log_every)
        self.start = self.tic = time.perf_counter()
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_path: Path | None = None
        self.stopped_by: str | None = None
        self.bar = tqdm(total=total, initial=initial, disable=not show_bar, dynamic_ncols=True, desc="pretrain")

    def epoch_started(self) -> None:
        self.tic = time.perf_counter()

    def record(self, epoch: int, step: int, loss: float, grad_norm: float, group: dict[str, Any], write: bool) -> None:
        """One optimizer step done (``group``: the optimizer's first param group; ``write``: this rank logs)."""
        toc = time.perf_counter()
        record = {
            "epoch": epoch,
            "step": step,
            "loss": loss,
            "lr": group["lr"],
            "weight_decay": group["weight_decay"],
            "grad_norm": grad_norm,
            "img_per_s": self.images_per_step / max(toc - self.tic, 1e-9),
        }
        self.tic = toc
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        if write and (step % self.log_every == 0 or step == self.total):
            self.metrics.log(record, step)
        self.bar.set_postfix(
            epoch=epoch, loss=f"{loss:.4f}", lr=f"{group['lr']:.2e}", img_s=f"{record['img_per_s']:.1f}"
        )
        self.bar.update(1)

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()

    def finish(
        self, step: int, steps_per_epoch: int, run_dir: Path, skipped: list[tuple[str, str]], write: bool
    ) -> TrainResult:
        """Log the closing lines (when ``write``: rank 0) and return the result."""
        seconds = self.seconds()
        if write:
            if skipped:
                lines = "\n  ".join(f"{path}: {reason}" for path, reason in skipped)
                log.warning("skipped %d unreadable files:\n  %s", len(skipped), lines)
            losses = [f"{v:.4f}" if v is not None else "n/a" for v in (self.first_loss, self.last_loss)]
            log.info(
                "finished %d steps in %.1f s; loss %s -> %s; checkpoint %s", step, seconds, *losses, self.last_path
            )
            if self.stopped_by is not None:
                log.warning(
                    "stopped by %s after step %d of %d; saved %s; rerun the same command to resume",
                    *(self.stopped_by, step, self.total, self.last_path),
                )
        return TrainResult(
            steps=step,
            epochs_done=step // steps_per_epoch,
            first_loss=self.first_loss,
            last_loss=self.last_loss,
            seconds=seconds,
            run_dir=run_dir,
            last_checkpoint=self.last_path,
            skipped_files=skipped,
            stopped_by=self.stopped_by,
        )
