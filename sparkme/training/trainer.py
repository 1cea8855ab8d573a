"""The pretraining loop as a library: ``Trainer(cfg, run_dir).fit()``.

``cfg`` is the composed Hydra config of ``sparkme-pretrain`` (groups ``model``, ``data``,
``optim``, ``schedule``, ``logger`` plus ``spark``, ``engine``, ``train``, ``checkpoint``,
``reconstruction``); the CLI is a thin layer that hands it over. The loop is exactly
resumable: data order is a function of (seed, epoch), each sample's augmentation and each
step's mask draw from seeds fixed by (seed, epoch/step, index), and checkpoints hold the
optimizer, step counter and RNG states. Only rank 0 writes files.

Run safety: one live process per run dir (``run.lock``); an epoch's reconstruction and
``epoch_NNNN.pth`` are written before ``last.pth`` (the file a resume reads), so a kill at any
instant leaves nothing a resume will not redo; SIGTERM/SIGINT finish the step, checkpoint and
return (``TrainResult.stopped_by``); a diverging step is never saved (``guard``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from sparkme.atomic import atomic_write_bytes
from sparkme.data.sampling import ResumableSampler, SeededTransformDataset, sample_seed
from sparkme.training.amp import step_autocast
from sparkme.training.build import (
    build_spark,
    check_batch_settings,
    instantiate_unwrapped,
    model_name_of,
    plain_config,
)
from sparkme.training.checkpoint import load_checkpoint, restore_rng, run_payload, save_checkpoint
from sparkme.training.distributed import DistInfo, all_reduce_mean, any_rank, init_distributed
from sparkme.training.guard import DivergenceError, DivergenceGuard, NonFiniteLossError, state_norms
from sparkme.training.inputs import pretraining_inputs
from sparkme.training.lock import RunDirLock
from sparkme.training.metrics import MetricsLogger
from sparkme.training.optim import apply_schedule, build_optimizer, effective_lr
from sparkme.training.progress import RunProgress, TrainResult
from sparkme.training.reconstructions import reconstruction_png
from sparkme.training.resume import check_same_model, load_model_state
from sparkme.training.rundir import saved_note, take_run_dir, write_on_rank0
from sparkme.training.schedule import CosineSchedule
from sparkme.training.signals import GracefulStop

__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "DivergenceError"]

log = logging.getLogger(__name__)


class Trainer:
    """SparK pretraining on one process or under ``torchrun`` (DDP).

    ``model_factory`` replaces the model built from ``cfg.model`` + ``cfg.spark`` (any module with
    ``forward(images, generator=None) -> (loss, pred, mask)`` and an ``encoder`` exposing
    ``downsample_ratio``); ``dataset`` replaces ``cfg.data.dataset`` (PIL images, labels ignored).
    """

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: str | Path,
        model_factory: Callable[[], nn.Module] | None = None,
        dataset: Any | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist: DistInfo = init_distributed(str(cfg.train.device))
        self.device = self.dist.device
        self.seed = int(cfg.train.seed)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self._seed_everything()

        # Model first (unknown names fail fast), then data, then the size checks: all before training.
        self.model = (
            model_factory()
            if model_factory is not None
            else build_spark(
                plain_config(cfg.model),
                plain_config(cfg.spark),
                backend=cfg.engine.get("backend"),
                sync_bn=bool(cfg.train.get("sync_bn", False)),  # encoder, densify and decoder BatchNorms
            )
        )
        if cfg.get("init_from"):  # released weights, model only; a resume below replaces them
            from sparkme.training.init_weights import init_from

            init_from(self.model, str(cfg.init_from))
        self.patch_size = int(self.model.encoder.downsample_ratio)
        spatial_dims = int(getattr(self.model.encoder, "spatial_dims", 2))
        mask_ratio = float(cfg.spark.get("mask_ratio", 0.6))
        self.inputs = pretraining_inputs(cfg.data, spatial_dims, self.patch_size, mask_ratio)
        self.image_size = self.inputs.size
        self.base_dataset = dataset if dataset is not None else self._build_dataset()
        if len(self.base_dataset) == 0:
            raise ValueError("the dataset is empty; point data.root at a folder with images or use data=demo")
        self.dataset = SeededTransformDataset(self.base_dataset, self.inputs.transform)
        self._build_loader()
        self._build_optimization()
        self.model.to(self.device)
        self.step = 0
        self._saved_step: int | None = None  # the step last.pth holds, once this process knows it
        self.guard = DivergenceGuard(self._where, self._note)
        self.lock = RunDirLock(self.run_dir)
        self._take_run_dir()
        try:
            self._maybe_resume()
            self.ddp_model = self._wrap_ddp()
            self.metrics = MetricsLogger(
                self.run_dir / "logs" if self.dist.is_main else None,
                tensorboard=bool(cfg.logger.get("tensorboard", False)),
                jsonl=bool(cfg.logger.get("jsonl", False)),
            )
        except BaseException:
            self._release_run_dir()
            raise

    # ---------------------------------------------------------------- set-up
    def _seed_everything(self) -> None:
        import random

        import numpy as np

        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def _build_dataset(self) -> Any:
        return instantiate_unwrapped(self.cfg.data.dataset, transform=None)

    def _build_loader(self) -> None:
        train = self.cfg.train
        self.micro_batch = check_batch_settings(train.batch_size, train.get("accum_steps", 1), self.dist.world_size)
        self.global_batch = int(train.batch_size)
        self.accum_steps = int(train.get("accum_steps", 1))
        self.sampler = ResumableSampler(
            self.dataset, self.dist.world_size, self.dist.rank, shuffle=True, seed=self.seed
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.micro_batch,
            sampler=self.sampler,
            num_workers=int(self.cfg.data.get("num_workers", 0)),
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG untouched
        )
        self.steps_per_epoch = len(self.loader) // self.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the dataset has {len(self.base_dataset)} images, fewer than one global batch of {self.global_batch}; "
                "lower train.batch_size or add images"
            )

    def _build_optimization(self) -> None:
        from hydra.utils import instantiate

        optim, schedule = self.cfg.optim, self.cfg.schedule
        self.peak_lr = effective_lr(float(optim.base_lr), self.global_batch)
        self.optimizer = build_optimizer(self.model, instantiate(optim.optimizer, _convert_="all"), self.peak_lr)
        self.epochs = int(self.cfg.train.epochs)
        total = self.epochs * self.steps_per_epoch
        warmup = min(total, round(float(schedule.warmup_epochs) * self.steps_per_epoch))
        self.schedule = CosineSchedule(
            peak_lr=self.peak_lr,
            total_steps=total,
            warmup_steps=warmup,
            min_lr_ratio=float(schedule.get("min_lr_ratio", CosineSchedule.min_lr_ratio)),
            warmup_start_ratio=float(schedule.get("warmup_start_ratio", CosineSchedule.warmup_start_ratio)),
            weight_decay=float(optim.weight_decay),
            weight_decay_end=float(optim.weight_decay_end),
        )

    def _resume_path(self) -> Path | None:
        if self.cfg.get("resume"):
            return Path(str(self.cfg.resume)).expanduser()
        last = self.checkpoint_dir / "last.pth"
        if self.cfg.get("auto_resume", True) and last.is_file():
            return last
        return None

    def _maybe_resume(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        checkpoint = load_checkpoint(path)
        saved_spe = checkpoint.get("steps_per_epoch")
        if saved_spe is not None and int(saved_spe) != self.steps_per_epoch:
            raise ValueError(
                f"{path} was written with {saved_spe} steps per epoch, this run has {self.steps_per_epoch}; "
                "resume with the same data and batch settings"
            )
        check_same_model(checkpoint, plain_config(self.cfg.model), path)
        load_model_state(self.model, checkpoint["model"], path)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = int(checkpoint["step"])
        restore_rng(checkpoint["rng"])
        if path.resolve() == (self.checkpoint_dir / "last.pth").resolve():
            self._saved_step = self.step
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.step // self.steps_per_epoch)

    def _take_run_dir(self) -> None:
        """Lock the run dir (rank 0) and clear what a killed run left there (every rank takes part)."""
        take_run_dir(self.lock, self.dist.is_main, self.checkpoint_dir, (self.run_dir / "reconstructions",))
        self._holds_run_dir = True

    def _release_run_dir(self) -> None:
        self.lock.release()
        self._holds_run_dir = False

    def _where(self) -> str:
        return f"step {self.step} (epoch {self.step // self.steps_per_epoch})"

    def _wrap_ddp(self) -> nn.Module:
        """The module the loop calls: compiled in place with ``train.compile`` (the sparse encoder stays
        eager; the state dict keeps its keys), wrapped in DDP on several ranks."""
        if self.cfg.train.get("compile", False):
            self.model.compile()
        if not self.dist.distributed:
            return self.model
        return nn.parallel.DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=bool(self.cfg.train.get("find_unused_parameters", False)),
        )

    # ---------------------------------------------------------------- loop
    def summary(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        encoder_params = sum(p.numel() for p in self.model.encoder.parameters())
        name = model_name_of(plain_config(self.cfg.model)) or str(self.cfg.model.get("_target_"))
        return "\n".join(
            [
                f"model        {name}: {params / 1e6:.2f} M parameters ({encoder_params / 1e6:.2f} M in the encoder)",
                f"optimizer    base lr {float(self.cfg.optim.base_lr):g} x batch {self.global_batch} / 256 "
                f"= effective lr {self.peak_lr:.3g}; {self.schedule.warmup_steps} warmup of "
                f"{self.schedule.total_steps} steps",
                f"data         {self.base_dataset!r}: {self.inputs.describe(len(self.base_dataset))}, "
                f"{self.steps_per_epoch} steps/epoch x {self.epochs} epochs",
                f"batch        global {self.global_batch} = {self.dist.world_size} ranks x {self.micro_batch} "
                f"x {self.accum_steps} accumulation",
                f"device       {self.device} (world size {self.dist.world_size}); run dir {self.run_dir}",
            ]
        )

    def _epoch_batches(self, epoch: int, skip_steps: int) -> Iterator[list[torch.Tensor]]:
        """Micro-batches grouped per optimizer step, starting ``skip_steps`` steps into ``epoch``."""
        self.sampler.set_epoch(epoch)
        self.sampler.skip(skip_steps * self.accum_steps * self.micro_batch)
        group: list[torch.Tensor] = []
        for images, _ in self.loader:
            group.append(images)
            if len(group) == self.accum_steps:
                yield group
                group = []

    def _train_step(self, micro_batches: list[torch.Tensor]) -> tuple[float, float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns (mean loss, grad norm)."""
        apply_schedule(self.optimizer, self.schedule.lr(self.step), self.schedule.wd(self.step))
        autocast = step_autocast(self.device, self.cfg.train.amp, self.cfg.train.get("cpu_amp", False))
        losses = []
        for i, images in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sample_seed(self.seed, self.step, self.dist.rank * self.accum_steps + i))
            sync = (
                nullcontext()
                if (i == len(micro_batches) - 1 or not self.dist.distributed)
                else self.ddp_model.no_sync()
            )
            with sync:
                with autocast:
                    loss, _, _ = self.ddp_model(images, generator=generator)
                mean_loss = all_reduce_mean(loss.detach().float()).item()
                self.guard.check_loss(mean_loss)
                (loss / len(micro_batches)).backward()
            losses.append(mean_loss)
        clip = self.cfg.optim.get("clip_grad")
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), float(clip) if clip else math.inf)
        self.guard.check_gradients(float(grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.check_weights(self.model.parameters(), self.model.buffers())
        self.step += 1
        return sum(losses) / len(losses), float(grad_norm)

    def _note(self) -> str:
        return saved_note(self.checkpoint_dir, self._saved_step)

    def save(self, name: str = "last.pth", copies: tuple[str, ...] = ()) -> Path:
        """Rank 0 writes ``checkpoints/<name>`` (after any ``copies``), each with its encoder safetensors.

        A failed write (e.g. a full disk) raises :class:`CheckpointWriteError` on every rank and
        leaves the previous files as they were.
        """
        path = self.checkpoint_dir / name

        def write() -> None:
            payload = run_payload(self.model, self.cfg, self.optimizer, self.step, self.steps_per_epoch)
            copy_paths = tuple(self.checkpoint_dir / copy for copy in copies)
            save_checkpoint(path, payload, model_name=payload["model_name"], copies=copy_paths)

        what = " and ".join(str(self.checkpoint_dir / n) for n in (*copies, name))
        write_on_rank0(self.dist.is_main, write, what, self.checkpoint_dir, self._note)
        if name == "last.pth":
            self._saved_step = self.step
        return path

    def save_reconstructions(self, epoch: int) -> Path | None:
        """Rank 0 writes ``reconstructions/epoch_NNNN.png`` (atomically) for fixed images and masks."""
        if not hasattr(self.model, "reconstruct"):
            return None
        path = self.run_dir / "reconstructions" / f"epoch_{epoch + 1:04d}.png"
        count, seed = int(self.cfg.reconstruction.get("num_images", 8)), self.seed

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            png = reconstruction_png(self.model, self.base_dataset, self.image_size, count, seed)
            atomic_write_bytes(path, png)

        write_on_rank0(self.dist.is_main, write, str(path), self.run_dir, self._note)
        return path

    # ---------------------------------------------------------------- fit
    def fit(self) -> TrainResult:
        """Train to ``train.epochs`` (or ``train.max_steps`` optimizer steps), checkpointing as configured.

        SIGTERM/SIGINT stop it after the current step with a checkpoint (``TrainResult.stopped_by``).
        """
        if not self._holds_run_dir:  # a second fit() on the same Trainer
            self._take_run_dir()
        if self.dist.is_main:
            log.info("sparkme pretraining\n%s", self.summary())
        max_steps = int(self.cfg.train.max_steps) if self.cfg.train.get("max_steps") else self.schedule.total_steps
        end = min(max_steps, self.schedule.total_steps)
        self.guard.weight_norm = state_norms(self.model.parameters(), [])[0]
        run = RunProgress(
            self.metrics,
            total=self.schedule.total_steps,
            initial=self.step,
            images_per_step=self.global_batch,
            log_every=int(self.cfg.logger.get("log_every_steps", 1)),
            show_bar=self.dist.is_main and bool(self.cfg.logger.get("progress_bar", True)),
        )
        try:
            with GracefulStop() as stop:
                self.ddp_model.train()
                while self.step < end and run.stopped_by is None:
                    self._run_epoch(end, stop, run)
        finally:
            run.close()
            self._release_run_dir()
        return self._finish(run)

    def _run_epoch(self, end: int, stop: GracefulStop, run: RunProgress) -> None:
        """Steps to the end of this epoch, ``end`` or a stop signal; then the matching checkpoint."""
        every_steps = int(self.cfg.checkpoint.get("every_steps", 0) or 0)
        epoch, skip = divmod(self.step, self.steps_per_epoch)
        run.epoch_started()
        for micro_batches in self._epoch_batches(epoch, skip):
            loss, grad_norm = self._train_step(micro_batches)
            run.record(epoch, self.step, loss, grad_norm, self.optimizer.param_groups[0], self.dist.is_main)
            if any_rank(stop.requested is not None):
                run.stopped_by = stop.requested or "a signal to another rank"
            if self.step >= end or run.stopped_by is not None:
                break
            if every_steps and self.step % every_steps == 0 and self.step % self.steps_per_epoch:
                run.last_path = self.save()
        if self.step % self.steps_per_epoch == 0:
            run.last_path = self._end_epoch(run.last_loss)
        else:  # stopped mid-epoch: keep the position for an exact resume
            run.last_path = self.save()

    def _end_epoch(self, last_loss: float | None) -> Path:
        """The epoch's reconstruction and ``epoch_NNNN.pth`` first, ``last.pth`` (what a resume reads) last."""
        done = self.step // self.steps_per_epoch
        every_epochs = int(self.cfg.checkpoint.get("every_epochs", 0) or 0)
        recon_every = int(self.cfg.reconstruction.get("every_epochs", 0) or 0)
        if recon_every and (done % recon_every == 0 or done == self.epochs):
            self.save_reconstructions(done - 1)
        copies = (f"epoch_{done:04d}.pth",) if every_epochs and done % every_epochs == 0 else ()
        path = self.save(copies=copies)
        if self.dist.is_main:
            log.info("epoch %d/%d done: step %d, loss %.4f", done, self.epochs, self.step, last_loss)
        return path

    def _finish(self, run: RunProgress) -> TrainResult:
        skipped = list(getattr(self.base_dataset, "skipped", []))
        return run.finish(self.step, self.steps_per_epoch, self.run_dir, skipped, self.dist.is_main)
