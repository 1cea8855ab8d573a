"""One place makes the process group: the CLI and the library both go through join_process_group."""

from __future__ import annotations

import pytest
import torch

from sparkme.training import distributed


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    backends: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(backends))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: backends.append(backend))
    return backends


def test_single_process_makes_no_group(recorded: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.join_process_group() is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_distributed("cpu").distributed is False
    assert recorded == []


def test_torchrun_joins_once_with_gloo_for_cpu_tensors(recorded: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.join_process_group() is True
    info = distributed.init_distributed("cpu")  # already joined (the CLI's case): no second group
    assert (info.rank, info.world_size, info.distributed) == (1, 2, True)
    assert recorded == ["cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"]
