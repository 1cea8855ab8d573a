"""A run dir's safety: one live process, tidied after a kill, a clear line when a write fails.

Rank 0 owns the run dir's files. It takes the lock, clears torn temporary files and derives any
encoder safetensors a kill left missing; a failed write (a full disk) becomes the same
:class:`CheckpointWriteError` on every rank, so no rank waits forever at the next collective.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from sparkme.atomic import remove_torn_writes
from sparkme.training.checkpoint import CheckpointError, CheckpointWriteError, restore_encoder_files
from sparkme.training.distributed import broadcast_object
from sparkme.training.lock import RunDirLock, RunDirLockedError

__all__ = ["take_run_dir", "saved_note", "write_on_rank0"]

log = logging.getLogger(__name__)

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _tidy(checkpoint_dir: Path, folders: tuple[Path, ...]) -> None:
    for folder in (checkpoint_dir, *folders):
        remove_torn_writes(folder)
    try:
        for path in restore_encoder_files(checkpoint_dir):
            log.info("wrote %s again from its .pth (the previous run was stopped between the two)", path)
    except CheckpointError as error:
        log.warning("could not derive a missing encoder safetensors: %s", error)


def take_run_dir(lock: RunDirLock, is_main: bool, checkpoint_dir: Path, folders: tuple[Path, ...] = ()) -> None:
    """Rank 0 locks the run dir and tidies it; every rank raises :class:`RunDirLockedError` if it is taken."""
    message = None
    if is_main:
        try:
            lock.acquire()
        except RunDirLockedError as error:
            message = str(error)
        else:
            _tidy(checkpoint_dir, folders)
    message = broadcast_object(message)
    if message is not None:
        raise RunDirLockedError(message)


def saved_note(checkpoint_dir: Path, saved_step: int | None) -> str:
    """What a resume would start from, truthfully: the last checkpoint and its step, or none."""
    last = checkpoint_dir / "last.pth"
    if not last.is_file():
        return "No checkpoint has been written yet"
    if saved_step is None:
        return f"{last} (written before this run started) is unchanged"
    return f"{last} (step {saved_step}) is unchanged"


def _failure_message(what: str, folder: Path, error: OSError, note: str) -> str:
    if error.errno in _DISK_FULL:
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        return (
            f"no space left on the device while writing {what} ({free}); {note}. Free some space and rerun the "
            "same command to resume"
        )
    reason = error.strerror or str(error)
    return f"could not write {what}: {reason}; {note}. Fix that and rerun the same command to resume"


def write_on_rank0(
    is_main: bool, write: Callable[[], object], what: str, folder: Path, note: Callable[[], str]
) -> None:
    """Run ``write`` (of ``what``, into ``folder``) on rank 0; an ``OSError`` becomes one
    :class:`CheckpointWriteError` on all ranks."""
    message = None
    if is_main:
        try:
            write()
        except OSError as error:
            message = _failure_message(what, folder, error, note())
    message = broadcast_object(message)
    if message is not None:
        raise CheckpointWriteError(message)
