"""Run ``sparkme-pretrain`` (the real CLI and configs) for subprocess tests.

With ``SPARKME_TEST_STANDIN=1`` the model is the tiny stand-in instead of the configured one.

Each rank also saves its final weights to ``$SPARKME_TEST_DUMP/rank<r>.pt`` when that is set,
so a test can check that DDP kept the ranks identical.

Fault injection for the run-safety tests (test-only seams, set through the environment):
``SPARKME_TEST_SLOW_WRITE=S`` pauses S seconds in the middle of every checkpoint file write and
between the renames of a checkpoint commit (so random kills land inside them);
``SPARKME_TEST_SIGNAL_AT_STEP=N:SIGTERM`` sends the process that signal once step N is done;
``SPARKME_TEST_ENOSPC_AT_WRITE=N`` makes the N-th file write fail with ENOSPC (a full disk).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _standin import StandInSpark  # noqa: E402

import sparkme.training.trainer as trainer_module  # noqa: E402

if os.environ.get("SPARKME_TEST_STANDIN") == "1":
    trainer_module.build_spark = lambda *args, **kwargs: StandInSpark()
_fit = trainer_module.Trainer.fit


def _install_faults() -> None:
    import errno
    import signal
    import time

    import sparkme.atomic as atomic

    pause = float(os.environ.get("SPARKME_TEST_SLOW_WRITE", "0"))
    enospc_at = int(os.environ.get("SPARKME_TEST_ENOSPC_AT_WRITE", "0"))
    writes = [0]
    write, fsync_dir = atomic._write, atomic._fsync_dir

    def faulty_write(handle, data):  # noqa: ANN001, ANN202
        writes[0] += 1
        if writes[0] == enospc_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        if pause:
            handle.write(data[: len(data) // 2])
            handle.flush()
            time.sleep(pause)
            return handle.write(data[len(data) // 2 :])
        return write(handle, data)

    def slow_fsync_dir(folder):  # noqa: ANN001, ANN202
        time.sleep(pause)
        return fsync_dir(folder)

    atomic._write = faulty_write
    if pause:
        atomic._fsync_dir = slow_fsync_dir
    at = os.environ.get("SPARKME_TEST_SIGNAL_AT_STEP")
    if at:
        step, name = at.split(":")
        train_step = trainer_module.Trainer._train_step

        def signalling_step(self, micro_batches):  # noqa: ANN001, ANN202
            out = train_step(self, micro_batches)
            if self.step == int(step):
                os.kill(os.getpid(), getattr(signal, name))
            return out

        trainer_module.Trainer._train_step = signalling_step


def _fit_and_dump(self):  # noqa: ANN001, ANN202
    result = _fit(self)
    dump = os.environ.get("SPARKME_TEST_DUMP")
    if dump:
        torch.save({k: v.detach().clone() for k, v in self.model.named_parameters()}, f"{dump}/rank{self.dist.rank}.pt")
    return result


trainer_module.Trainer.fit = _fit_and_dump
_install_faults()

from sparkme.cli.pretrain import main  # noqa: E402

main()
