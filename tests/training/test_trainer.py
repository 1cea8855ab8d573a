"""The training loop as a library, on the tiny stand-in model: resume, NaN stop, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from _helpers import tiny
from _standin import StandInSpark
from test_data import _write_mixed_folder

from sparkme.training.checkpoint import load_checkpoint
from sparkme.training.trainer import NonFiniteLossError, Trainer


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
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2.*last good checkpoint"):
        trainer.fit()
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


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
        (["data.image_size=16"], "at least one must be hidden and one visible"),
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
    straight = Trainer(tiny(*common, "train.max_steps=4"), tmp_path / "straight")
    straight.fit()
    Trainer(tiny(*common, "train.max_steps=2"), tmp_path / "resumed").fit()
    torch.manual_seed(999)
    resumed = Trainer(tiny(*common, "train.max_steps=4"), tmp_path / "resumed")
    assert resumed.step == 2 and resumed.fit().steps == 4
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)
