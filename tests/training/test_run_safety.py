"""No run loses work: SIGTERM/SIGINT, a full disk, a second process on the same run dir, and
SIGKILLs at random instants (inside checkpoint writes too), all on the tiny stand-in model."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import TINY, tiny
from _standin import StandInSpark

from sparkme.training.checkpoint import CheckpointWriteError, encoder_safetensors_path, load_checkpoint
from sparkme.training.lock import LOCK_NAME, RunDirLock, RunDirLockedError
from sparkme.training.signals import RESUMABLE_EXIT_CODE, GracefulStop
from sparkme.training.trainer import Trainer

HERE = Path(__file__).resolve().parent


def _trainer(run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(tiny("logger=none", *overrides), run_dir, model_factory=StandInSpark)


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _assert_bitwise(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different, different


def _signal_at(trainer: Trainer, step: int, signum: int) -> None:
    original = trainer._train_step

    def step_then_signal(micro_batches):  # noqa: ANN001, ANN202
        out = original(micro_batches)
        if trainer.step == step:
            os.kill(os.getpid(), signum)
        return out

    trainer._train_step = step_then_signal


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path: Path, signum: int) -> None:
    straight = _trainer(tmp_path / "straight")
    straight.fit()
    stopped = _trainer(tmp_path / "run")
    _signal_at(stopped, 4, signum)  # mid-epoch 1 (3 steps per epoch)
    result = stopped.fit()
    assert result.stopped_by == signal.Signals(signum).name and result.steps == 4
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")["step"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers only while training
    torch.manual_seed(7)
    resumed = _trainer(tmp_path / "run")
    assert resumed.step == 4 and resumed.fit().stopped_by is None
    _assert_bitwise(_weights(resumed), _weights(straight))


def test_a_second_signal_acts_as_usual() -> None:
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def test_disk_full_is_one_message_and_keeps_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sparkme.atomic as atomic

    trainer = _trainer(tmp_path, "checkpoint.every_steps=1", "reconstruction.every_epochs=0")
    calls = [0]

    def full_after_two_saves(handle, data):  # noqa: ANN001, ANN202
        calls[0] += 1
        if calls[0] > 4:  # two checkpoints of two files each, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return handle.write(data)

    monkeypatch.setattr(atomic, "_write", full_after_two_saves)
    last = tmp_path / "checkpoints" / "last.pth"
    with pytest.raises(
        CheckpointWriteError,
        match=rf"no space left on the device while writing {last.parent / 'epoch_0001.pth'} and {last} \("
        rf"\d+ MiB free there\); {last} \(step 2\) is unchanged\. Free some space",
    ) as info:
        trainer.fit()
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert load_checkpoint(last)["step"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.encoder.safetensors", "last.pth"]
    assert not (tmp_path / LOCK_NAME).exists()  # released on the way out


def _lock_holder(run_dir: Path) -> subprocess.Popen:
    """Another process that holds ``run_dir``'s lock until killed (SIGKILL leaves the lock file stale)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sparkme.training.lock import RunDirLock; "
         "lock = RunDirLock(sys.argv[1]); lock.acquire(); print('locked', flush=True); time.sleep(300)", str(run_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_live_run_dir_is_refused_and_a_stale_lock_taken_over(tmp_path: Path) -> None:
    holder = _lock_holder(tmp_path)
    try:
        with pytest.raises(
            RunDirLockedError,
            match=rf"run dir {tmp_path} is in use by another sparkme-pretrain "
            rf"\(pid {holder.pid} on host .*, since .*\)",
        ) as info:
            _trainer(tmp_path)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, stale
        holder.wait(timeout=30)
    assert (tmp_path / LOCK_NAME).exists()
    trainer = _trainer(tmp_path, "train.max_steps=1")
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()
    with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):  # a second Trainer in this process
        RunDirLock(tmp_path).acquire()
    trainer.fit()
    assert not (tmp_path / LOCK_NAME).exists()


class _Killed(BaseException):
    """Stands for SIGKILL inside a file operation: nothing in the trainer catches it."""


@pytest.mark.parametrize(("seam", "calls"), [("_write", 10), ("_fsync_dir", 11)])
def test_a_kill_inside_any_epoch_end_write_is_redone_by_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seam: str, calls: int
) -> None:
    """Stop a 2-epoch run at every write / directory sync of its epoch ends (picture, epoch copy,
    last.pth, their safetensors), resume: every epoch's files exist, agree and match a straight run."""
    from safetensors.torch import load_file

    import sparkme.atomic as atomic

    straight = _trainer(tmp_path / "straight")
    straight.fit()
    original = getattr(atomic, seam)
    for n in range(1, calls + 1):
        run_dir, count = tmp_path / f"n{n}", [0]

        def killed_at_n(*args, n=n, count=count):  # noqa: ANN002, ANN202
            count[0] += 1
            if count[0] == n:
                raise _Killed
            return original(*args)

        monkeypatch.setattr(atomic, seam, killed_at_n)
        with pytest.raises(_Killed):
            _trainer(run_dir).fit()
        monkeypatch.setattr(atomic, seam, original)
        resumed = _trainer(run_dir)
        resumed.fit()
        _assert_bitwise(_weights(resumed), _weights(straight))
        for epoch in (1, 2):
            path = run_dir / "checkpoints" / f"epoch_{epoch:04d}.pth"
            _assert_bitwise(load_file(encoder_safetensors_path(path)), load_checkpoint(path)["encoder"])
            png = f"reconstructions/epoch_{epoch:04d}.png"
            assert (run_dir / png).read_bytes() == (tmp_path / "straight" / png).read_bytes(), (n, png)


# ------------------------------------------------------------------ the command line


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "SPARKME_TEST_STANDIN": "1", **extra}


CLI_RUN = ["train.epochs=4", "checkpoint.every_steps=2", "logger.progress_bar=false", "logger.tensorboard=false"]


def _cli(run_dir: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(HERE / "_launch_cli.py"), *TINY, *CLI_RUN, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(command, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _run_cli(run_dir: Path, env: dict[str, str], *extra: str) -> tuple[int, str]:
    process = _cli(run_dir, env, *extra)
    out, err = process.communicate(timeout=300)
    return process.returncode, out + err


def test_a_refused_launch_leaves_the_live_run_dir_untouched(tmp_path: Path) -> None:
    """The CLI checks the lock before Hydra writes ``.hydra/`` and ``pretrain.log`` into the run dir."""
    run_dir = tmp_path / "live"
    (run_dir / ".hydra").mkdir(parents=True)
    files = {run_dir / ".hydra" / "config.yaml": "live run's config\n", run_dir / "pretrain.log": "live run's log\n"}
    for path, text in files.items():
        path.write_text(text)
    holder = _lock_holder(run_dir)
    try:
        code, output = _run_cli(run_dir, _env())
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert code == 1, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "is in use by another sparkme-pretrain" in lines[0], output
    assert {path: path.read_text() for path in files} == files
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "pretrain.log", "run.lock"]


def _reference(tmp_path: Path) -> dict[str, torch.Tensor]:
    (tmp_path / "dump_ref").mkdir()
    code, output = _run_cli(tmp_path / "reference", _env(SPARKME_TEST_DUMP=str(tmp_path / "dump_ref")))
    assert code == 0, output[-3000:]
    return torch.load(tmp_path / "dump_ref" / "rank0.pt")


def test_cli_sigterm_and_disk_full(tmp_path: Path) -> None:
    """SIGTERM: exit 75 with one line, checkpoint at the step reached, exact resume. ENOSPC: one error line."""
    expected = _reference(tmp_path)
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    code, output = _run_cli(run_dir, _env(SPARKME_TEST_SIGNAL_AT_STEP="5:SIGTERM"))
    assert code == RESUMABLE_EXIT_CODE, output[-3000:]
    line = f"stopped by SIGTERM after step 5 of 12; saved {run_dir / 'checkpoints' / 'last.pth'}; rerun the same"
    assert line in output and line in (run_dir / "pretrain.log").read_text() and "Traceback" not in output
    assert load_checkpoint(run_dir / "checkpoints" / "last.pth")["step"] == 5
    code, output = _run_cli(run_dir, _env(SPARKME_TEST_DUMP=str(dump)))
    assert code == 0, output[-3000:]
    _assert_bitwise(torch.load(dump / "rank0.pt"), expected)

    full = tmp_path / "full"
    code, output = _run_cli(full, _env(SPARKME_TEST_ENOSPC_AT_WRITE="5"))  # step 3: png, epoch .pth, its st
    assert code == 1 and "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    written = f"{full / 'checkpoints' / 'epoch_0001.pth'} and {full / 'checkpoints' / 'last.pth'}"
    assert len(errors) == 1 and f"no space left on the device while writing {written}" in errors[0], output[-3000:]
    assert f"{full / 'checkpoints' / 'last.pth'} (step 2) is unchanged" in errors[0]
    assert errors[0].split("error: ", 1)[1] in (full / "pretrain.log").read_text()
    assert load_checkpoint(full / "checkpoints" / "last.pth")["step"] == 2


def _wait_for_log(run_dir: Path, process: subprocess.Popen, text: str, count: int = 1) -> bool:
    """True once the run's log holds ``text`` ``count`` times, False if ``process`` exited first."""
    while process.poll() is None:
        try:
            if (run_dir / "pretrain.log").read_text().count(text) >= count:
                return True
        except OSError:
            pass
        time.sleep(0.01)
    return False


def _steps_saved(run_dir: Path) -> int:
    last = run_dir / "checkpoints" / "last.pth"
    return load_checkpoint(last)["step"] if last.exists() else 0


def _inside_a_write(run_dir: Path) -> bool:
    """A kill left a torn temporary file or a .pth whose safetensors is not renamed in yet."""
    folders = [run_dir / "checkpoints", run_dir / "reconstructions"]
    files = [p for folder in folders if folder.exists() for p in folder.iterdir()]
    torn = any(".tmp-" in p.name for p in files)
    return torn or any(p.suffix == ".pth" and not encoder_safetensors_path(p).exists() for p in files)


def _kill_at_random_instants(run_dir: Path, kills: int, active: float, seed: int) -> tuple[int, int]:
    """SIGKILL each launch at a random instant of its training (after set-up and resume) until the
    schedule is done; returns (kills, kills that left a checkpoint write unfinished)."""
    rng = random.Random(seed)
    env = _env(SPARKME_TEST_SLOW_WRITE="0.05")
    killed = inside = 0
    for launch in range(1, kills + 1):
        if _steps_saved(run_dir) == 12:
            break
        process = _cli(run_dir, env)
        try:
            if _wait_for_log(run_dir, process, "sparkme pretraining", count=launch):  # set-up and resume done
                process.wait(timeout=rng.uniform(0.0, active / 4))  # about two checkpoints' worth
        except subprocess.TimeoutExpired:
            process.kill()
            killed += 1
        process.communicate(timeout=60)
        inside += _inside_a_write(run_dir)
    return killed, inside


def _check_schedule(run_dir: Path, reference: Path, epochs: int) -> None:
    from safetensors.torch import load_file

    names = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert not [n for n in names if ".tmp-" in n], names
    for epoch in range(1, epochs + 1):
        path = run_dir / "checkpoints" / f"epoch_{epoch:04d}.pth"
        checkpoint = load_checkpoint(path)
        assert checkpoint["step"] == 3 * epoch
        _assert_bitwise(checkpoint["model"], load_checkpoint(reference / "checkpoints" / path.name)["model"])
        png = f"reconstructions/epoch_{epoch:04d}.png"
        assert (run_dir / png).read_bytes() == (reference / png).read_bytes(), png
    for path in (run_dir / "checkpoints").glob("*.pth"):
        tensors, encoder = load_file(encoder_safetensors_path(path)), load_checkpoint(path)["encoder"]
        _assert_bitwise(tensors, encoder)
    assert names == {f"{n}.{e}" for n in ["last", *(f"epoch_{i:04d}" for i in range(1, 5))]
                     for e in ("pth", "encoder.safetensors")}  # fmt: skip


@pytest.mark.slow
def test_sigkill_at_random_instants_loses_nothing(tmp_path: Path) -> None:
    """Up to 16 SIGKILLs at random instants of a 4-epoch CLI run (writes slowed so kills land inside them,
    and drawn after set-up), then a clean run: every epoch file, safetensors and picture exist and
    equal an uninterrupted run's, and so do the final weights."""
    expected = _reference(tmp_path)
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    timing = _cli(tmp_path / "timing", _env(SPARKME_TEST_SLOW_WRITE="0.05"))
    assert _wait_for_log(tmp_path / "timing", timing, "sparkme pretraining")
    started = time.perf_counter()
    assert _wait_for_log(tmp_path / "timing", timing, "finished 12 steps")
    active = time.perf_counter() - started
    timing.communicate(timeout=300)
    killed, inside = _kill_at_random_instants(run_dir, kills=16, active=active, seed=14)
    assert killed >= 8 and inside >= 1, (killed, inside)
    print(f"{killed} kills, {inside} inside a checkpoint write")
    code, output = _run_cli(run_dir, _env(SPARKME_TEST_DUMP=str(dump), SPARKME_TEST_SLOW_WRITE="0.05"))
    assert code == 0, output[-3000:]
    _check_schedule(run_dir, tmp_path / "reference", epochs=4)
    _assert_bitwise(torch.load(dump / "rank0.pt"), expected)


def _torchrun(run_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, str(HERE / "_launch_cli.py"), *TINY, *CLI_RUN, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(command, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split():
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no rank {rank} worker under {launcher.pid}")


@pytest.mark.slow
def test_torchrun_lock_and_sigterm_to_one_rank(tmp_path: Path) -> None:
    """2 gloo ranks: a second launch on the live run dir is refused by both its ranks; SIGTERM to
    rank 1 alone stops both ranks at the same step with a checkpoint (exit 75); the resume is exact."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    for folder in ("dump_ref", "dump"):
        (tmp_path / folder).mkdir()
    done = _torchrun(reference, _env(SPARKME_TEST_DUMP=str(tmp_path / "dump_ref")))
    output = done.communicate(timeout=300)[0]
    assert done.returncode == 0, output[-3000:]
    first = _torchrun(run_dir, _env(SPARKME_TEST_SLOW_WRITE="0.3"))
    try:
        assert _wait_for_log(run_dir, first, "epoch 1/4 done")
        second = _torchrun(run_dir, _env())
        output = second.communicate(timeout=300)[0]
        refusals = re.findall(r"error: run dir \S+ is in use by another", output)
        assert second.returncode != 0 and len(refusals) == 2, output[-3000:]
        os.kill(_rank_pid(first, 1), signal.SIGTERM)
        output = first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            first.kill()
    # torchrun SIGTERMs the ranks still running once one rank has exited: the first to exit reports 75 (the
    # resumable stop), a slower sibling may be reported as -15; the checkpoint and the exact resume below
    # show both ranks stopped at the same step
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", output)
    assert "75" in codes and set(codes) <= {"75", "-15"}, output[-3000:]
    log = (run_dir / "pretrain.log").read_text()
    stopped = [line for line in log.splitlines() if "stopped by a signal to another rank after step" in line]
    assert len(stopped) == 1, log[-3000:]
    step = int(stopped[0].split("after step ")[1].split(" ")[0])
    assert load_checkpoint(run_dir / "checkpoints" / "last.pth")["step"] == step < 12
    resumed = _torchrun(run_dir, _env(SPARKME_TEST_DUMP=str(tmp_path / "dump")))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    for rank in (0, 1):
        _assert_bitwise(
            torch.load(tmp_path / "dump" / f"rank{rank}.pt"), torch.load(tmp_path / "dump_ref" / "rank0.pt")
        )
