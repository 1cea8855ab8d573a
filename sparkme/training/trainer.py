"""The pretraining loop as a library: ``Trainer(cfg, run_dir).fit()``.

``cfg`` is the composed Hydra config of ``sparkme-pretrain`` (groups ``model``, ``data``,
``optim``, ``schedule``, ``logger`` plus ``spark``, ``engine``, ``train``, ``checkpoint``,
``reconstruction``); the CLI is a thin layer that hands it over. The loop is exactly
resumable: data order is a function of (seed, epoch), each sample's augmentation and each
step's mask draw from seeds fixed by (seed, epoch/step, index), and checkpoints hold the
optimizer, step counter and RNG states. Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from sparkme.data.sampling import ResumableSampler, SeededTransformDataset, sample_seed
from sparkme.data.transforms import denormalize, eval_transform, pretrain_transform
from sparkme.training.build import (
    build_spark,
    check_batch_settings,
    check_image_size,
    instantiate_unwrapped,
    model_name_of,
)
from sparkme.training.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from sparkme.training.distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from sparkme.training.metrics import MetricsLogger
from sparkme.training.optim import apply_schedule, build_optimizer, effective_lr
from sparkme.training.schedule import CosineSchedule

__all__ = ["Trainer", "TrainResult", "NonFiniteLossError"]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before the bad step touches the weights."""


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


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _config_yaml(cfg: DictConfig) -> str:
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # interpolations that only resolve inside Hydra (e.g. ${hydra:...})
        return OmegaConf.to_yaml(cfg, resolve=False)


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
                _plain(cfg.model),
                _plain(cfg.spark),
                backend=cfg.engine.get("backend"),
                sync_bn=bool(cfg.train.get("sync_bn", False)),  # encoder, densify and decoder BatchNorms
            )
        )
        if cfg.get("init_from"):  # released weights, model only; a resume below replaces them
            from sparkme.training.init_weights import init_from

            init_from(self.model, str(cfg.init_from))
        self.patch_size = int(self.model.encoder.downsample_ratio)
        self.image_size = int(cfg.data.image_size)
        check_image_size(self.image_size, self.patch_size, float(cfg.spark.get("mask_ratio", 0.6)))
        self.base_dataset = dataset if dataset is not None else self._build_dataset()
        if len(self.base_dataset) == 0:
            raise ValueError("the dataset is empty; point data.root at a folder with images or use data=demo")
        self.dataset = SeededTransformDataset(
            self.base_dataset, pretrain_transform(self.image_size, tuple(cfg.data.get("crop_scale", (0.67, 1.0))))
        )
        self._build_loader()
        self._build_optimization()
        self.model.to(self.device)
        self.step = 0
        if self.dist.is_main:
            for stale in self.checkpoint_dir.glob(".*.tmp-*"):  # torn writes of a killed run
                stale.unlink(missing_ok=True)
        self._maybe_resume()
        self.ddp_model = self._wrap_ddp()
        self.metrics = MetricsLogger(
            self.run_dir / "logs" if self.dist.is_main else None,
            tensorboard=bool(cfg.logger.get("tensorboard", False)),
            jsonl=bool(cfg.logger.get("jsonl", False)),
        )

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
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = int(checkpoint["step"])
        restore_rng(checkpoint["rng"])
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.step // self.steps_per_epoch)

    def _wrap_ddp(self) -> nn.Module:
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
        name = model_name_of(_plain(self.cfg.model)) or str(self.cfg.model.get("_target_"))
        return "\n".join(
            [
                f"model        {name}: {params / 1e6:.2f} M parameters ({encoder_params / 1e6:.2f} M in the encoder)",
                f"optimizer    base lr {float(self.cfg.optim.base_lr):g} x batch {self.global_batch} / 256 "
                f"= effective lr {self.peak_lr:.3g}; {self.schedule.warmup_steps} warmup of "
                f"{self.schedule.total_steps} steps",
                f"data         {self.base_dataset!r}: {len(self.base_dataset)} images at {self.image_size}px, "
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
        autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and bool(self.cfg.train.amp)
        )
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
                mean_loss = all_reduce_mean(loss.detach().float())
                if not torch.isfinite(mean_loss):
                    raise NonFiniteLossError(
                        f"loss is {mean_loss.item()} at step {self.step} (epoch {self.step // self.steps_per_epoch}); "
                        f"stopped before updating the weights. The last good checkpoint "
                        f"({self.checkpoint_dir / 'last.pth'}) is intact; lower optim.base_lr, check the data, "
                        f"or resume from it."
                    )
                (loss / len(micro_batches)).backward()
            losses.append(mean_loss.item())
        clip = self.cfg.optim.get("clip_grad")
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), float(clip) if clip else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return sum(losses) / len(losses), float(grad_norm)

    def save(self, name: str = "last.pth") -> Path | None:
        """Rank 0 writes ``checkpoints/<name>`` (+ the dense encoder as safetensors) atomically."""
        path = self.checkpoint_dir / name
        if self.dist.is_main:
            encoder = self.model.encoder
            dense = encoder.dense_state_dict() if hasattr(encoder, "dense_state_dict") else None
            model_cfg = _plain(self.cfg.model)
            import sparkme

            payload = {
                "model": self.model.state_dict(),
                "encoder": dense,
                "model_cfg": model_cfg,
                "model_name": getattr(encoder, "model_name", None) or model_name_of(model_cfg),
                "spark_cfg": _plain(self.cfg.spark),
                "backend": self.cfg.engine.get("backend"),
                "config": _config_yaml(self.cfg),
                "optimizer": self.optimizer.state_dict(),
                "epoch": self.step // self.steps_per_epoch,
                "step": self.step,
                "steps_per_epoch": self.steps_per_epoch,
                "rng": capture_rng(),
                "sparkme_version": sparkme.__version__,
            }
            save_checkpoint(path, payload, model_name=payload["model_name"])
        barrier()
        return path

    def save_reconstructions(self, epoch: int) -> Path | None:
        """Rank 0 writes a PNG: input, masked input and reconstruction rows for fixed images and masks."""
        if not self.dist.is_main or not hasattr(self.model, "reconstruct"):
            return None
        from torchvision.utils import save_image

        count = min(int(self.cfg.reconstruction.get("num_images", 8)), len(self.base_dataset))
        transform = eval_transform(self.image_size)
        images = torch.stack([transform(self.base_dataset[i][0]) for i in range(count)]).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.reconstruct(images, generator=generator)
        finally:
            self.model.train(was_training)
        rows = [denormalize(out[key].float()) for key in ("input", "masked", "reconstruction")]
        path = self.run_dir / "reconstructions" / f"epoch_{epoch + 1:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(torch.cat(rows).cpu(), path, nrow=count, padding=2)
        return path

    def fit(self) -> TrainResult:
        """Train to ``train.epochs`` (or ``train.max_steps`` optimizer steps), checkpointing as configured."""
        from tqdm import tqdm

        cfg = self.cfg
        if self.dist.is_main:
            log.info("sparkme pretraining\n%s", self.summary())
        total = self.schedule.total_steps
        max_steps = int(cfg.train.max_steps) if cfg.train.get("max_steps") else total
        every_epochs = int(cfg.checkpoint.get("every_epochs", 0) or 0)
        every_steps = int(cfg.checkpoint.get("every_steps", 0) or 0)
        recon_every = int(cfg.reconstruction.get("every_epochs", 0) or 0)
        log_every = max(1, int(cfg.logger.get("log_every_steps", 1)))
        images_per_step = self.global_batch
        first_loss = last_loss = None
        last_path: Path | None = None
        start = time.perf_counter()
        bar = tqdm(
            total=total,
            initial=self.step,
            disable=not (self.dist.is_main and cfg.logger.get("progress_bar", True)),
            dynamic_ncols=True,
            desc="pretrain",
        )
        self.ddp_model.train()
        stopped = self.step >= max_steps
        try:
            while not stopped and self.step < total:
                epoch, skip = divmod(self.step, self.steps_per_epoch)
                tic = time.perf_counter()
                for micro_batches in self._epoch_batches(epoch, skip):
                    loss, grad_norm = self._train_step(micro_batches)
                    toc = time.perf_counter()
                    record = {
                        "epoch": epoch,
                        "step": self.step,
                        "loss": loss,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "weight_decay": self.optimizer.param_groups[0]["weight_decay"],
                        "grad_norm": grad_norm,
                        "img_per_s": images_per_step / max(toc - tic, 1e-9),
                    }
                    tic = toc
                    first_loss = loss if first_loss is None else first_loss
                    last_loss = loss
                    if self.dist.is_main and (self.step % log_every == 0 or self.step == total):
                        self.metrics.log(record, self.step)
                    bar.set_postfix(
                        epoch=epoch, loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['img_per_s']:.1f}"
                    )
                    bar.update(1)
                    if every_steps and self.step % every_steps == 0:
                        last_path = self.save()
                    if self.step >= max_steps:
                        stopped = True
                        break
                if stopped and self.step % self.steps_per_epoch:
                    last_path = self.save()  # stopped mid-epoch: keep the position for an exact resume
                    break
                done = self.step // self.steps_per_epoch
                last_path = self.save()
                if every_epochs and done % every_epochs == 0:
                    self.save(f"epoch_{done:04d}.pth")
                if recon_every and (done % recon_every == 0 or done == self.epochs):
                    self.save_reconstructions(done - 1)
                if self.dist.is_main:
                    log.info("epoch %d/%d done: step %d, loss %.4f", done, self.epochs, self.step, last_loss)
        finally:
            bar.close()
            self.metrics.close()
        seconds = time.perf_counter() - start
        skipped = list(getattr(self.base_dataset, "skipped", []))
        if self.dist.is_main:
            if skipped:
                log.warning(
                    "skipped %d unreadable files:\n  %s", len(skipped), "\n  ".join(f"{p}: {r}" for p, r in skipped)
                )
            log.info(
                "finished %d steps in %.1f s; loss %s -> %s; checkpoint %s",
                self.step,
                seconds,
                f"{first_loss:.4f}" if first_loss is not None else "n/a",
                f"{last_loss:.4f}" if last_loss is not None else "n/a",
                last_path,
            )
        return TrainResult(
            steps=self.step,
            epochs_done=self.step // self.steps_per_epoch,
            first_loss=first_loss,
            last_loss=last_loss,
            seconds=seconds,
            run_dir=self.run_dir,
            last_checkpoint=last_path,
            skipped_files=skipped,
        )
