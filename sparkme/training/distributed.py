"""torchrun integration: process group set-up, rank info, and small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparkme.errors import UserError

__all__ = [
    "DistInfo",
    "join_process_group",
    "init_distributed",
    "all_reduce_mean",
    "any_rank",
    "broadcast_object",
    "barrier",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str, local_rank: int) -> torch.device:
    """``train.device`` (auto | cpu | cuda | cuda:N | ...) as a torch device; a clear error when unusable."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError as error:
        raise UserError(f"train.device={device} is not a torch device; use auto, cpu or cuda") from error
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"train.device={device} but this machine has no usable CUDA GPU "
                "(torch.cuda.is_available() is False); use train.device=cpu or train.device=auto"
            )
        if target.index is None:
            return torch.device("cuda", local_rank)
        if target.index >= torch.cuda.device_count():
            raise UserError(f"train.device={device} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return target


def join_process_group() -> bool:
    """Join torchrun's process group once, when ``WORLD_SIZE`` > 1; returns whether there is one.

    The one place a process group is made: gloo for CPU tensors, plus nccl for CUDA tensors when a
    GPU is visible (so CPU collectives such as :func:`broadcast_object` work on GPU runs too).
    ``sparkme-pretrain`` calls it before Hydra starts, :func:`init_distributed` for library use.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return True


def init_distributed(device: str = "auto") -> DistInfo:
    """Rank, world size and device of this process; joins the torchrun process group (:func:`join_process_group`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = _pick_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    join_process_group()
    return DistInfo(rank, world_size, local_rank, target)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = torch.tensor([float(flag)])
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())
    return flag
