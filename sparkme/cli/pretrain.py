"""``sparkme-pretrain``: the Hydra command line over :class:`sparkme.training.trainer.Trainer`.

Examples::

    sparkme-pretrain                                   # CPU demo on built-in images (ResNet-18, 128 steps)
    sparkme-pretrain experiment=spark_resnet50 data.root=/data/imagenet/train
    sparkme-pretrain model=convnext_tiny train.epochs=2 --multirun spark.mask_ratio=0.5,0.6
    torchrun --nproc_per_node 8 -m sparkme.cli.pretrain experiment=spark_resnet50 data.root=...
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

__all__ = ["main", "run"]

log = logging.getLogger("sparkme.pretrain")

_RUN_TIME_ENV = "SPARKME_RUN_TIME"


def _run_time() -> float:
    """One start time per run, shared by all torchrun ranks (so they agree on the output dir)."""
    if _RUN_TIME_ENV not in os.environ:
        os.environ[_RUN_TIME_ENV] = repr(time.time())
    return float(os.environ[_RUN_TIME_ENV])


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("sparkme_now"):
        OmegaConf.register_new_resolver("sparkme_now", lambda fmt: datetime.fromtimestamp(_run_time()).strftime(fmt))


def _join_torchrun() -> None:
    """Under torchrun: join the process group before Hydra starts, agree on rank 0's start time,
    and keep the other ranks from writing Hydra's own files into the shared run dir."""
    import torch.distributed as dist

    from sparkme.training.distributed import broadcast_object, join_process_group

    if not join_process_group():
        return
    os.environ[_RUN_TIME_ENV] = repr(broadcast_object(_run_time()))
    if dist.get_rank() != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
        logging.getLogger("sparkme").setLevel(logging.WARNING)


def _unset(node: object, prefix: str = "") -> list[str]:
    """Dotted names of mandatory settings still at ``???`` in a plain (unresolved) config."""
    if isinstance(node, dict):
        return [name for key, value in node.items() for name in _unset(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [name for index, value in enumerate(node) for name in _unset(value, f"{prefix}{index}.")]
    return [prefix[:-1]] if node == "???" else []


def check_required(cfg: DictConfig) -> None:
    """Refuse a config whose mandatory settings (``???``, e.g. ``data.root``) were not given."""
    from sparkme.errors import UserError

    unset = _unset(OmegaConf.to_container(cfg, resolve=False))
    if unset:
        raise UserError(
            f"{', '.join(unset)} must be set: add {unset[0]}=... to the command line "
            "(e.g. data=imagefolder data.root=/path/to/images)"
        )


def run(cfg: DictConfig, run_dir: str | Path) -> float | None:
    """Pretrain with a composed config into ``run_dir``; returns the last loss (for sweepers)."""
    from sparkme.cli.errors import USER_ERRORS, report_error
    from sparkme.training.checkpoint import CheckpointError
    from sparkme.training.signals import RESUMABLE_EXIT_CODE
    from sparkme.training.trainer import DivergenceError, Trainer

    try:
        check_required(cfg)
        result = Trainer(cfg, run_dir).fit()
    except (*USER_ERRORS, DivergenceError, CheckpointError) as error:
        report_error("sparkme-pretrain", error, log_files=True)  # one line on stderr and in pretrain.log
        raise SystemExit(1) from None
    if result.stopped_by is not None:  # SIGTERM/SIGINT: checkpoint saved; a requeued job resumes from it
        raise SystemExit(RESUMABLE_EXIT_CODE)
    return result.last_loss


@hydra.main(version_base="1.3", config_path="pkg://sparkme.conf", config_name="pretrain")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run(cfg, HydraConfig.get().runtime.output_dir)


def _refuse_a_live_run_dir(argv: list[str]) -> None:
    """A run dir named on the command line (``hydra.run.dir=...``) that a live run holds is refused
    before Hydra writes its config and log into it."""
    from sparkme.cli.errors import report_error
    from sparkme.training.lock import RunDirLockedError, check_not_live

    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra.run.dir" and value:
            try:
                check_not_live(value)
            except RunDirLockedError as error:
                report_error("sparkme-pretrain", error)
                raise SystemExit(1) from None


def main() -> None:
    """Console entry point (``sparkme-pretrain``)."""
    _refuse_a_live_run_dir(sys.argv[1:])
    _register_resolvers()
    _join_torchrun()
    finished = False
    try:
        _hydra_main()
        finished = True
    finally:
        _leave_process_group(finished)


def _leave_process_group(finished: bool) -> None:
    """Tear the process group down; after a normal finish every rank first waits for the others, so
    no rank closes its gloo connections while a peer still talks on them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


_register_resolvers()

if __name__ == "__main__":
    main()
