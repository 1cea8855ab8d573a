"""The training loop as a library, on the tiny stand-in model: resume, divergence stops, bad input."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from _helpers import assert_exact_resume, tiny
from _standin import StandInSpark
from test_data import _write_mixed_folder

from sparkme.training.checkpoint import load_checkpoint
from sparkme.training.guard import state_norms
from sparkme.training.trainer import DivergenceError, NonFiniteLossError, Trainer


def _trainer(run_dir: Path, *overrides: str, **model_kwargs) -> Trainer:
    return Trainer(tiny("logger=none", *overrides), run_dir, model_factory=lambda: StandInSpark(**model_kwargs))


def test_exact_resume_after_kill_mid_epoch(tmp_path: Path) -> None:
    """4 steps straight == 2 steps, a fresh process state, resume, 2 more (3 steps/epoch: crosses an epoch)."""
    straight = _trainer(tmp_path / "straight", "train.max_steps=4")
    straight.fit()
    first = _trainer(tmp_path / "resumed", "train.max_steps=2")
    assert first.fit().steps == 2
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pth")["step"] == 2
    torch.manual_seed(12345)  # the "killed" process's RNG must not leak into the resumed one
    resumed = _trainer(tmp_path / "resumed", "train.max_steps=4")
    assert resumed.step == 2
    assert resumed.fit().steps == 4
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)
    exp_opt, act_opt = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for index in exp_opt:
        torch.testing.assert_close(act_opt[index]["exp_avg"], exp_opt[index]["exp_avg"], atol=1e-6, rtol=0)


def test_run_writes_outputs_and_loss_falls(tmp_path: Path) -> None:
    trainer = Trainer(tiny("train.epochs=6", "optim.base_lr=0.5"), tmp_path, model_factory=StandInSpark)
    result = trainer.fit()
    assert result.steps == 18 and result.last_loss < result.first_loss
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"checkpoints/last.pth", "checkpoints/last.encoder.safetensors", "checkpoints/epoch_0006.pth"} <= names
    assert "logs/metrics.jsonl" in names and any(n.startswith("logs/tensorboard/events") for n in names)
    assert "reconstructions/epoch_0006.png" in names
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 18 and '"lr"' in lines[0] and '"img_per_s"' in lines[0]
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert checkpoint["epoch"] == 6 and "train:" in checkpoint["config"] and checkpoint["model_cfg"]["model_name"]
    assert set(checkpoint["rng"]) >= {"torch", "numpy", "python"}


def test_nan_loss_stops_with_message_and_intact_checkpoint(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "checkpoint.every_steps=1", nan_at_call=3)
    last = tmp_path / "checkpoints" / "last.pth"
    with pytest.raises(NonFiniteLossError, match=rf"loss is nan at step 2 .*{last} \(step 2\) is unchanged") as info:
        trainer.fit()
    assert "\n" not in str(info.value) and "good" not in str(info.value)
    checkpoint = load_checkpoint(last)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_nan_loss_before_any_checkpoint_says_there_is_none(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, nan_at_call=2)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 1 .*No checkpoint has been written yet") as info:
        trainer.fit()
    assert "unchanged" not in str(info.value) and "intact" not in str(info.value)
    assert not (tmp_path / "checkpoints" / "last.pth").exists()


def test_exploding_update_is_never_saved(tmp_path: Path) -> None:
    """A finite loss with an absurd lr: the update that blows the weights up stops the run unsaved."""
    trainer = _trainer(tmp_path, "optim.base_lr=1e14", "checkpoint.every_steps=1", "schedule.warmup_start_ratio=0")
    initial = state_norms(trainer.model.parameters(), [])[0]
    last = tmp_path / "checkpoints" / "last.pth"
    with pytest.raises(
        DivergenceError, match=rf"blew the weights up \(global norm .* -> .*\) at step 1 .*{last} \(step 1\)"
    ):
        trainer.fit()  # step 0 has lr 0 (and is saved), step 1 has lr ~1e12
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    weights = [v for k, v in saved["model"].items() if v.is_floating_point() and "running" not in k]
    norm = state_norms(weights, [])[0]
    assert math.isfinite(norm) and norm < 2 * initial, (norm, initial)


def test_non_finite_gradients_stop_before_the_update(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    calls = [0]

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return grad * float("inf") if calls[0] == 2 else grad

    trainer.model.decoder.weight.register_hook(poison)
    before = {}

    def remember(module, args):  # noqa: ANN001, ANN202
        before.update({k: v.detach().clone() for k, v in trainer.model.named_parameters()})

    trainer.model.register_forward_pre_hook(remember)
    with pytest.raises(DivergenceError, match="gradient norm is (nan|inf) at step 1 .*stopped before updating"):
        trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.named_parameters())


def test_resume_with_another_model_is_one_clear_line(tmp_path: Path) -> None:
    _trainer(tmp_path, "train.max_steps=1").fit()
    with pytest.raises(
        ValueError, match=r"written by a different model \(model.model_name: 'resnet18' -> 'resnet50'"
    ) as info:
        _trainer(tmp_path, "model.model_name=resnet50")
    assert "\n" not in str(info.value)

    class Wider(StandInSpark):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = torch.nn.ConvTranspose2d(16, 3, 16, 16, bias=False)

    with pytest.raises(
        ValueError, match=r"does not fit this model: weights 1 unexpected \(e.g. decoder.bias\)"
    ) as info:
        Trainer(tiny("logger=none"), tmp_path, model_factory=Wider)
    assert "\n" not in str(info.value)


def test_folder_with_bad_files_trains_and_reports_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_mixed_folder(tmp_path / "images")
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(
            tmp_path / "run",
            "data=imagefolder",
            f"data.root={tmp_path / 'images'}",
            "data.num_workers=0",
            "data.image_size=32",
            "train.batch_size=4",
            "train.epochs=2",
        )
        result = trainer.fit()
    assert result.steps == 4
    assert {Path(p).name for p, _ in result.skipped_files} == {"notes.txt", "fake.jpg", "truncated.jpg"}
    assert "skipped 3 unreadable files" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.image_size=40"], "not a multiple of the encoder's total stride 16"),
        (["data.image_size=16"], "at least one patch must be hidden and one visible"),
        (["spark.mask_ratio=1.2"], "mask_ratio must lie strictly between 0 and 1"),
        (["train.batch_size=64"], "fewer than one global batch"),
    ],
)
def test_bad_input_fails_before_training(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, *overrides)
    assert not (tmp_path / "checkpoints").exists()


def test_empty_folder_and_unknown_model_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable image"):
        _trainer(tmp_path / "run", "data=imagefolder", f"data.root={tmp_path / 'empty'}")
    with pytest.raises(ValueError, match=r"unknown model 'resnet5O'.*did you mean.*resnet50"):
        Trainer(tiny("model.model_name=resnet5O"), tmp_path / "run2")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gather"])
def test_exact_resume_with_the_real_sparse_model(tmp_path: Path, backend: str) -> None:
    """Same check on a real sparse ResNet + SparK (64 px, 2x2 patches): RNG, masks and BN statistics all resume.

    The default ``gather`` backend only: stock MinkowskiEngine's CPU kernels are not run-to-run
    deterministic (two identical 2-step runs already differ), so no resume can match them to 1e-6.
    """
    common = [
        "model=custom",  # ResNet-10 from timm parts: a real sparse encoder, cheaper than resnet18
        "data.image_size=64",
        "train.batch_size=2",
        "data.dataset.length=6",  # 3 steps per epoch: the resume crosses an epoch boundary
        "logger=none",
        "reconstruction.every_epochs=0",
        f"engine.backend={backend}",
    ]
    assert_exact_resume(common, tmp_path)
