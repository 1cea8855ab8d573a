"""Atomic checkpoint files: loaders, RNG capture, a SIGKILL in the middle of a save, and the
.pth/.encoder.safetensors pair that never disagrees (every interruption point, a full disk)."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparkme.training.checkpoint import (
    CheckpointError,
    capture_rng,
    encoder_safetensors_path,
    load_checkpoint,
    restore_encoder_files,
    restore_rng,
    save_checkpoint,
)


def _payload(step: int) -> dict:
    weight = torch.full((4, 4), float(step))
    return {
        "model": {"w": weight},
        "encoder": {"conv.weight": weight * 2},
        "model_cfg": {"_target_": "timm.create_model", "model_name": "resnet18", "pretrained": False},
        "model_name": "resnet18",
        "spark_cfg": {"mask_ratio": 0.6},
        "config": "train:\n  seed: 0\n",
        "optimizer": {},
        "epoch": 0,
        "step": step,
        "rng": capture_rng(),
        "sparkme_version": "0.1.0",
    }


def test_save_and_load_round_trip_with_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "last.pth", _payload(3))
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.full((4, 4), 3.0))
    with safe_open(encoder_safetensors_path(path), "pt") as handle:
        assert handle.metadata() == {"model_name": "resnet18", "format": "timm"}
        assert torch.equal(handle.get_tensor("conv.weight"), torch.full((4, 4), 6.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.encoder.safetensors", "last.pth"]


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    broken = tmp_path / "broken.pth"
    save_checkpoint(broken, _payload(1))
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(broken)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a sparkme checkpoint"):
        load_checkpoint(tmp_path / "foreign.pth")


def test_rng_state_round_trip() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    import sparkme.atomic as atomic
    import sparkme.training.checkpoint as checkpoint

    path, marker = Path(sys.argv[1]), Path(sys.argv[2])
    payload = torch.load(sys.argv[3], weights_only=True)

    normal_write = atomic._write

    def slow_write(handle, data):
        if ".pth.tmp-" not in handle.name:  # the safetensors file is written normally
            return normal_write(handle, data)
        handle.write(data[: len(data) // 2])
        handle.flush()
        marker.write_text("half written")
        time.sleep(120)

    atomic._write = slow_write
    checkpoint.save_checkpoint(path, payload)
    """
)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint(path, _payload(1))
    newer = tmp_path / "newer.pt"
    torch.save(_payload(2), newer)
    marker = tmp_path / "marker"
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(marker), str(newer)])
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert process.poll() is None, "writer exited before reaching the save"
            assert time.time() < deadline, "writer never reached the save"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".") and ".tmp-" in p.name for p in tmp_path.iterdir())  # the torn temp file
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.full((4, 4), 1.0))
    from safetensors.torch import load_file

    assert set(load_file(encoder_safetensors_path(path))) == {"conv.weight"}  # complete (old or new), never torn


class _Interrupted(BaseException):
    """Stands for a kill: raised from a seam, never caught by the code under test."""


def _pair_state(path: Path) -> str:
    """'agree' (both present, equal encoders), 'no-safetensors', or 'DISAGREE'."""
    from safetensors.torch import load_file

    side = encoder_safetensors_path(path)
    if not side.exists():
        return "no-safetensors"
    encoder = load_checkpoint(path)["encoder"]
    tensors = load_file(side)
    same = tensors.keys() == encoder.keys() and all(torch.equal(tensors[k], encoder[k]) for k in encoder)
    return "agree" if same else "DISAGREE"


@pytest.mark.parametrize("seam", ["_write", "_fsync_dir"])
def test_pair_never_disagrees_whatever_call_a_kill_interrupts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seam: str
) -> None:
    """Interrupt the n-th write or directory sync of a save, for every n: the pair agrees or the
    safetensors is missing (and is then derived again from the .pth, equal to its encoder)."""
    import sparkme.atomic as atomic

    original = getattr(atomic, seam)
    outcomes = set()
    for n in range(1, 8):
        folder = tmp_path / f"{seam}{n}"
        path = save_checkpoint(folder / "last.pth", _payload(1))
        calls = [0]

        def interrupt(*args, n=n, original=original, calls=calls):  # noqa: ANN002, ANN202
            calls[0] += 1
            if calls[0] == n:
                raise _Interrupted
            return original(*args)

        monkeypatch.setattr(atomic, seam, interrupt)
        try:
            save_checkpoint(path, _payload(2))
            finished = True
        except _Interrupted:
            finished = False
        monkeypatch.setattr(atomic, seam, original)
        state = _pair_state(path)
        assert state in ("agree", "no-safetensors"), (seam, n, state)
        step = load_checkpoint(path)["step"]
        outcomes.add((step, state, finished))
        restore_encoder_files(folder)
        assert _pair_state(path) == "agree"
        assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
    if seam == "_fsync_dir":  # the kill between the renames was really reached, on both sides of the .pth
        assert {(1, "no-safetensors", False), (2, "no-safetensors", False)} <= outcomes, outcomes
    assert (2, "agree", True) in outcomes


def test_disk_full_during_save_keeps_the_previous_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sparkme.atomic as atomic

    path = save_checkpoint(tmp_path / "last.pth", _payload(1), copies=(tmp_path / "epoch_0001.pth",))
    for n in (1, 2):  # the .pth temp file, then the safetensors temp file

        def full(handle, data, n=n, calls=[0]):  # noqa: ANN001, ANN202, B006
            calls[0] += 1
            if calls[0] == n:
                raise OSError(errno.ENOSPC, "No space left on device")
            return handle.write(data)

        monkeypatch.setattr(atomic, "_write", full)
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(path, _payload(2))
        monkeypatch.undo()
        assert load_checkpoint(path)["step"] == 1 and _pair_state(path) == "agree"
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "epoch_0001.encoder.safetensors",
            "epoch_0001.pth",
            "last.encoder.safetensors",
            "last.pth",
        ]
