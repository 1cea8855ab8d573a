"""Atomic file writes: readers see the old file or the complete new one, never a torn one.

Data goes to a temporary file beside the target (``.NAME.tmp-PID``), is fsynced, renamed over the
target with ``os.replace`` and the folder is fsynced. Checkpoints, exports and reconstruction
pictures are all written this way. ``_write`` and ``_fsync_dir`` are the seams tests replace to
simulate a kill or a full disk in the middle of a write.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

__all__ = ["atomic_write_bytes", "remove_torn_writes", "sync_dir", "write_temp"]


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a fsynced temporary file beside ``path`` (removed again if writing fails)."""
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            _write(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so readers only ever see the old or the complete new file."""
    path = Path(path)
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_dir(path.parent)


def remove_torn_writes(folder: str | os.PathLike[str]) -> None:
    """Delete the temporary files a killed writer left in ``folder`` (only while no writer runs)."""
    for stale in Path(folder).glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def sync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (fsync of the directory)."""
    _fsync_dir(folder)


def _write(handle: io.BufferedWriter, data: bytes) -> None:
    """The raw write (a seam tests use to simulate a kill halfway through a save)."""
    handle.write(data)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
