"""One live process per run dir: ``<run dir>/run.lock`` held with ``flock`` while a run trains.

The kernel drops an ``flock`` when its holder dies (even by SIGKILL), so a lock left behind by a
killed run is stale by construction and the next run takes it over; the file's text (pid, host,
start time) only serves the refusal message. Where the filesystem has no ``flock`` the file's
pid is checked instead (same host only). Under torchrun rank 0 holds the lock for all ranks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sparkme.errors import UserError

__all__ = ["RunDirLock", "RunDirLockedError", "LOCK_NAME", "check_not_live"]

LOCK_NAME = "run.lock"


class RunDirLockedError(UserError):
    """Another live process trains in this run dir."""


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {info['pid']} on host {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process whose details could not be read"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDirLock:
    """``acquire()`` or raise :class:`RunDirLockedError`; ``release()`` removes the lock file."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                raise self._refusal()
            if self._same_file(fd):  # not unlinked by a releasing holder meanwhile
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd

    def _flock(self, fd: int) -> bool:
        """True when locked; False when a live holder has it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as error:  # no flock on this filesystem: fall back to the recorded pid
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return not self._recorded_holder_alive()

    def _recorded_holder_alive(self) -> bool:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if info.get("host") != socket.gethostname():
            return True  # cannot check another host's processes: assume it is live
        return int(info.get("pid", -1)) != os.getpid() and _pid_alive(int(info.get("pid", -1)))

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _refusal(self) -> RunDirLockedError:
        return RunDirLockedError(
            f"run dir {self.path.parent} is in use by another sparkme-pretrain ({_holder_text(self.path)}); "
            f"wait for it or stop it, or pick another run dir (hydra.run.dir=...). If no such process is "
            f"running any more, delete {self.path}"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting process re-checks the inode
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def check_not_live(run_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`RunDirLockedError` when a live process holds ``run_dir``'s lock; touches nothing.

    The CLI calls it before Hydra writes its own files (``.hydra/``, ``pretrain.log``) into a run dir
    given on the command line, so a refused launch leaves the live run's files alone.
    """
    lock = RunDirLock(run_dir)
    if not lock.path.is_file():
        return
    try:
        fd = os.open(lock.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise lock._refusal() from None
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS) or not lock._recorded_holder_alive():
            return
        raise lock._refusal() from None
    finally:
        os.close(fd)  # also drops the shared lock just taken
