"""The trainer's GPU-only branches whose logic is not CUDA's, run on the CPU.

- mixed precision: ``train.amp`` turns bf16 autocast on for AMP device types (CUDA); adding the CPU
  runs the GPU's training step with CPU bf16 autocast: the sparse encoder (gather backend) and the
  decoder compute in bf16, weights, gradients and the optimizer state stay fp32;
- device placement: ``train.device`` resolves to the local rank's GPU, ``cuda:N`` is checked against
  the visible devices, and the process selects its GPU (CUDA's answers are faked);
- CUDA RNG: every GPU's generator state goes into the checkpoint and comes back on resume, and a GPU
  checkpoint resumes on a machine without CUDA (``torch.cuda``'s RNG calls are faked).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from _helpers import tiny
from torch import nn

from sparkme.errors import UserError
from sparkme.training import amp, checkpoint, distributed
from sparkme.training.trainer import Trainer

REAL_SPARSE = [
    "model=custom",  # ResNet-10 from timm parts: a real sparse encoder
    "data.image_size=64",
    "train.batch_size=2",
    "data.dataset.length=2",
    "train.epochs=1",
    "logger=none",
    "reconstruction.every_epochs=0",
    "checkpoint.every_epochs=0",
    "engine.backend=gather",
]


def _record_encoder_dtypes(encoder: nn.Module) -> set[torch.dtype]:
    """The dtypes of the feature maps the encoder hands out, dense (``forward``) or sparse (``forward_maps``)."""
    seen: set[torch.dtype] = set()
    for name in ("forward", "forward_maps"):
        original = getattr(encoder, name, None)
        if original is None:
            continue

        def recording(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            seen.update(getattr(f, "features", f).dtype for f in out)
            return out

        setattr(encoder, name, recording)
    return seen


def _one_step_dtypes(
    tmp_path: Path, amp_on: bool, *overrides: str
) -> tuple[Trainer, set[torch.dtype], set[torch.dtype]]:
    """Run one optimizer step; return the trainer and the dtypes seen leaving the encoder and the decoder."""
    trainer = Trainer(tiny(*REAL_SPARSE, f"train.amp={str(amp_on).lower()}", *overrides), tmp_path)
    encoder_out = _record_encoder_dtypes(trainer.model.encoder)
    decoder_out: set[torch.dtype] = set()
    for module in trainer.model.modules():
        if isinstance(module, nn.Conv2d) and not any(module is m for m in trainer.model.encoder.modules()):
            module.register_forward_hook(lambda m, i, out: decoder_out.add(out.dtype))
    result = trainer.fit()
    assert result.steps == 1 and math.isfinite(result.last_loss)
    return trainer, encoder_out, decoder_out


def test_amp_step_runs_the_encoder_and_decoder_in_bf16_and_keeps_fp32_state(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(amp, "AMP_DEVICE_TYPES", ("cuda", "cpu"))
    trainer, encoder_out, decoder_out = _one_step_dtypes(tmp_path, amp_on=True)
    assert encoder_out == {torch.bfloat16} and torch.bfloat16 in decoder_out
    for name, param in trainer.model.named_parameters():
        assert param.dtype == torch.float32 and torch.isfinite(param).all(), name
    for state in trainer.optimizer.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.parametrize("allowed, amp_on", [(("cuda",), True), (("cuda", "cpu"), False)])
def test_amp_stays_off_on_the_cpu_by_default_and_when_disabled(tmp_path: Path, monkeypatch, allowed, amp_on) -> None:
    monkeypatch.setattr(amp, "AMP_DEVICE_TYPES", allowed)
    _, encoder_out, decoder_out = _one_step_dtypes(tmp_path, amp_on=amp_on)
    assert encoder_out == decoder_out == {torch.float32}


def test_cpu_amp_runs_the_cpu_step_in_bf16(tmp_path: Path) -> None:
    """``train.cpu_amp=true``: the real CPU step in bf16 (encoder on the gather backend, decoder), fp32 state."""
    trainer, encoder_out, decoder_out = _one_step_dtypes(tmp_path, False, "train.cpu_amp=true")
    assert encoder_out == {torch.bfloat16} and torch.bfloat16 in decoder_out
    assert all(param.dtype == torch.float32 for param in trainer.model.parameters())


def test_step_autocast_is_bf16_on_cuda_with_amp_and_on_the_cpu_with_cpu_amp(monkeypatch) -> None:
    monkeypatch.setattr(amp.torch, "autocast", lambda device_type, dtype, enabled: (device_type, dtype, enabled))
    assert amp.step_autocast(torch.device("cuda", 1), True) == ("cuda", torch.bfloat16, True)
    assert amp.step_autocast(torch.device("cuda"), False) == ("cuda", torch.bfloat16, False)
    assert amp.step_autocast(torch.device("cpu"), True) == ("cpu", torch.bfloat16, False)
    assert amp.step_autocast(torch.device("cpu"), False, cpu_amp=True) == ("cpu", torch.bfloat16, True)
    assert amp.step_autocast(torch.device("cuda"), False, cpu_amp=True) == ("cuda", torch.bfloat16, False)


@pytest.fixture()
def two_gpus(monkeypatch) -> list[torch.device]:
    """``torch.cuda`` answering like a machine with two GPUs; returns the devices selected by ``set_device``."""
    selected: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: selected.append(torch.device(device)))
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    return selected


@pytest.mark.parametrize(
    "requested, local_rank, expected",
    [("auto", 0, "cuda:0"), ("auto", 1, "cuda:1"), ("cuda", 1, "cuda:1"), ("cuda:1", 0, "cuda:1"), ("cpu", 1, "cpu")],
)
def test_device_resolves_to_the_local_ranks_gpu(two_gpus, monkeypatch, requested, local_rank, expected) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    info = distributed.init_distributed(requested)
    assert info.device == torch.device(expected)
    assert two_gpus == ([torch.device(expected)] if expected != "cpu" else [])


def test_a_gpu_index_beyond_the_visible_ones_is_one_clear_error(two_gpus) -> None:
    with pytest.raises(UserError, match=r"train.device=cuda:2 but only 2 CUDA device\(s\) are visible"):
        distributed.init_distributed("cuda:2")
    assert two_gpus == []


def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.init_distributed("auto").device == torch.device("cpu")
    with pytest.raises(UserError, match="no usable CUDA GPU"):
        distributed.init_distributed("cuda")


class FakeCudaRng:
    """``torch.cuda``'s RNG calls on a machine with ``count`` GPUs, each state a distinct byte tensor."""

    def __init__(self, count: int) -> None:
        self.states = [torch.arange(16, dtype=torch.uint8) + 16 * i for i in range(count)]
        self.restored: list[list[torch.Tensor]] = []

    def install(self, monkeypatch, available: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: self.restored.append(list(states)))


def _through_a_checkpoint_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save({"rng": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["rng"]  # how load_checkpoint reads it


def test_every_gpus_rng_state_is_saved_and_restored(monkeypatch) -> None:
    gpus = FakeCudaRng(count=2)
    gpus.install(monkeypatch)
    state = _through_a_checkpoint_file(checkpoint.capture_rng())
    assert len(state["cuda"]) == 2
    checkpoint.restore_rng(state)
    assert len(gpus.restored) == 1
    for restored, original in zip(gpus.restored[0], gpus.states, strict=True):
        assert torch.equal(restored, original)


def test_a_gpu_checkpoint_resumes_without_cuda_and_a_cpu_one_on_a_gpu(monkeypatch) -> None:
    gpus = FakeCudaRng(count=1)
    gpus.install(monkeypatch)
    gpu_state = _through_a_checkpoint_file(checkpoint.capture_rng())
    gpus.install(monkeypatch, available=False)
    checkpoint.restore_rng(gpu_state)  # no CUDA here: the CPU, numpy and python states still come back
    assert gpus.restored == []
    cpu_state = _through_a_checkpoint_file(checkpoint.capture_rng())
    assert "cuda" not in cpu_state
    gpus.install(monkeypatch, available=True)
    checkpoint.restore_rng(cpu_state)
    assert gpus.restored == []
    expected = torch.rand(3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    checkpoint.restore_rng(_through_a_checkpoint_file(checkpoint.capture_rng()))
    assert torch.equal(torch.rand(3), expected)


# ---- the same paths on a real GPU (``pytest -m gpu``; skipped without CUDA) --------------------------


@pytest.mark.gpu
def test_amp_step_on_cuda_runs_bf16_and_keeps_fp32_state(tmp_path: Path) -> None:
    from _helpers import TINY, compose

    overrides = [o for o in TINY if not o.startswith("train.device")]
    cfg = compose([*overrides, *REAL_SPARSE, "train.device=cuda", "train.amp=true"])
    trainer = Trainer(cfg, tmp_path)
    encoder_out = _record_encoder_dtypes(trainer.model.encoder)
    result = trainer.fit()
    assert result.steps == 1 and math.isfinite(result.last_loss)
    assert trainer.device.type == "cuda" and encoder_out == {torch.bfloat16}
    for name, param in trainer.model.named_parameters():
        assert param.is_cuda and param.dtype == torch.float32 and torch.isfinite(param).all(), name


@pytest.mark.gpu
def test_cuda_rng_state_round_trips_through_a_checkpoint() -> None:
    torch.cuda.manual_seed_all(7)
    state = _through_a_checkpoint_file(checkpoint.capture_rng())
    expected = torch.rand(5, device="cuda")
    torch.cuda.manual_seed_all(8)
    checkpoint.restore_rng(state)
    assert torch.equal(torch.rand(5, device="cuda"), expected)


def test_cpu_amp_warns_on_a_cpu_without_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16"):
        amp.step_autocast(torch.device("cpu"), False, cpu_amp=True)
