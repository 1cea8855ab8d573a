"""Pretraining on volumes end to end: the CLI on demo volumes, exact resume, dense 3D weights, and clear
errors when the data's rank and the model's differ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import assert_exact_resume, compose, tiny
from hydra.utils import instantiate
from safetensors.torch import load_file

from sparkme.training.checkpoint import encoder_safetensors_path, load_checkpoint
from sparkme.training.trainer import Trainer

VOLUMES = ["experiment=spark3d_demo", "data.volume_size=16", "train.batch_size=2", "data.dataset.length=6"]


def _pretrain(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sparkme.cli.pretrain", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_cli_pretrains_on_demo_volumes(tmp_path: Path) -> None:
    """3 steps an epoch for 2 epochs: checkpoints, dense encoder weights, slice pictures and logs."""
    run_dir = tmp_path / "run"
    done = _pretrain(run_dir, *VOLUMES, "debug=tiny", "logger.jsonl=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "volumes at 16^3 voxels" in (run_dir / "pretrain.log").read_text()
    for epoch in (1, 2):
        assert (run_dir / "reconstructions" / f"epoch_{epoch:04d}.png").stat().st_size > 0
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    assert checkpoint["step"] == 6
    losses = [json.loads(line)["loss"] for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(0 < loss < 10 for loss in losses)
    # the dense 3D weights load, strictly and bit for bit, into the network the model config builds
    dense = load_file(encoder_safetensors_path(run_dir / "checkpoints" / "last.pth"))
    network = instantiate(compose(VOLUMES).model)
    network.load_state_dict(dense)
    assert all(torch.equal(dense[k], v) for k, v in checkpoint["encoder"].items())
    # sparkme-visualize rebuilds the 3D model from the checkpoint and plots slices of a volume file
    volume = tmp_path / "scan.npy"
    np.save(volume, np.random.default_rng(0).normal(size=(20, 18, 16)).astype(np.float32))
    command = ["-m", "sparkme.cli.visualize", str(run_dir / "checkpoints" / "last.pth"), str(volume)]
    picture = tmp_path / "slices.png"
    shown = subprocess.run([sys.executable, *command, "--image-size", "16", "--out", str(picture)], timeout=300)
    assert shown.returncode == 0 and picture.read_bytes().startswith(b"\x89PNG")
    # sparkme-export (timm formats) points a non-timm model at its dense weights file instead
    export = ["-m", "sparkme.cli.export", str(run_dir / "checkpoints" / "last.pth"), "--format", "timm"]
    refused = subprocess.run(
        [sys.executable, *export, "--out", str(tmp_path / "x.pth")], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "encoder.safetensors" in refused.stderr, refused.stderr


def test_exact_resume_on_volumes(tmp_path: Path) -> None:
    """4 steps straight == 2 steps, a fresh process state, resume, 2 more (3 steps an epoch: crosses one)."""
    assert_exact_resume([*VOLUMES, "logger=none", "reconstruction.every_epochs=0"], tmp_path)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=resnet3d_small"], "model is a 3-d CNN that takes volumes; use data=demo3d or data=volumefolder"),
        (["experiment=spark3d_demo", "model=resnet18"], "model is a 2-d CNN that takes images; use data=demo"),
        (["experiment=spark3d_demo", "data.volume_size=20"], "data.volume_size=20"),
    ],
)
def test_data_and_model_of_different_rank_are_clear_errors(tmp_path: Path, overrides: list[str], message: str):
    with pytest.raises(ValueError, match=message):
        Trainer(tiny(*overrides), tmp_path / "run")


@pytest.mark.slow
def test_demo_volumes_loss_falls(tmp_path: Path) -> None:
    """The documented 3D demo, shortened: the last epoch's mean loss is below the first's."""
    run_dir = tmp_path / "run"
    done = _pretrain(run_dir, "experiment=spark3d_demo", "train.epochs=4", "logger.jsonl=true")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first, (first, last)
