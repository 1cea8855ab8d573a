"""The real Hydra configs and the ``sparkme-pretrain`` command line, end to end."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import TINY, compose, tiny
from _standin import StandInSpark
from omegaconf import OmegaConf

from sparkme.training.build import build_dense_model, check_model_name

CONF = Path(__file__).resolve().parents[2] / "conf"
HERE = Path(__file__).resolve().parent


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_option_composes() -> None:
    for model in _options("model"):
        cfg = compose([f"model={model}"])
        assert cfg.model._target_
        if cfg.model._target_ == "timm.create_model":
            assert cfg.model.model_name == model and cfg.model.pretrained is False
            check_model_name(cfg.model.model_name)
    for logger in _options("logger"):
        assert {"tensorboard", "jsonl", "progress_bar"} <= set(compose([f"logger={logger}"]).logger)
    assert OmegaConf.is_missing(compose(["data=imagefolder"]).data, "root")
    assert compose(["data=imagefolder", "data.root=/x"]).data.dataset.root == "/x"
    assert compose(["data=demo"]).data.dataset._target_ == "sparkme.data.demo.DemoDataset"
    assert compose(["optim=lamb", "schedule=cosine"]).optim.optimizer._target_ == "timm.optim.Lamb"
    assert set(_options("data")) == {"demo", "imagefolder", "demo3d", "volumefolder"} and len(_options("model")) >= 15


def test_paper_recipes() -> None:
    experiments = [e for e in _options("experiment") if e.startswith("spark_")]  # spark3d_demo: a demo
    assert "spark_resnet50" in experiments and any(e.startswith("spark_convnext") for e in experiments)
    for experiment in experiments:
        cfg = compose([f"experiment={experiment}", "data.root=/imagenet/train"])
        assert cfg.train.batch_size == 4096 and cfg.optim.base_lr == 2e-4 and cfg.schedule.warmup_epochs == 40
        assert cfg.spark.mask_ratio == 0.6 and cfg.spark.decoder_width == 768 and cfg.data.image_size == 224
        assert cfg.optim.weight_decay == 0.04 and cfg.optim.weight_decay_end == 0.2 and cfg.optim.clip_grad == 5.0
        assert cfg.model.model_name in experiment
    assert compose(["experiment=spark_resnet50"]).train.epochs == 1600


def test_custom_model_builds_a_timm_feature_network() -> None:
    model = build_dense_model(OmegaConf.to_container(compose(["model=custom"]).model))
    assert [info["reduction"] for info in model.feature_info][-1] == 32


def _env(standin: bool = False) -> dict[str, str]:
    flag = {"SPARKME_TEST_STANDIN": "1"} if standin else {}
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **flag}


@pytest.mark.slow
def test_cli_end_to_end_with_the_real_model(tmp_path: Path) -> None:
    """``python -m sparkme.cli.pretrain`` on resnet18 (sparse engine, SparK): files a user expects."""
    run_dir = tmp_path / "run"
    overrides = [
        f"hydra.run.dir={run_dir}",
        "data.image_size=64",
        "data.dataset.length=8",
        "train.batch_size=4",
        "train.epochs=1",
        "checkpoint.every_epochs=1",
        "reconstruction.num_images=2",
        "logger.progress_bar=false",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "sparkme.cli.pretrain", *overrides],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    expected = {
        ".hydra/config.yaml",
        "checkpoints/last.pth",
        "checkpoints/last.encoder.safetensors",
        "checkpoints/epoch_0001.pth",
        "logs/metrics.jsonl",
        "reconstructions/epoch_0001.png",
    }
    assert expected <= files, files
    log_text = (run_dir / "pretrain.log").read_text()
    assert "effective lr" in log_text and "world size 1" in log_text and "finished 2 steps" in log_text

    from safetensors.torch import load_file

    from sparkme.training.checkpoint import load_spark

    model = load_spark(run_dir / "checkpoints" / "last.pth")
    encoder_weights = load_file(run_dir / "checkpoints" / "last.encoder.safetensors")
    dense = model.encoder.dense_state_dict()
    assert encoder_weights.keys() == dense.keys()
    assert all(torch.equal(encoder_weights[k], dense[k]) for k in dense)

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparkme.cli.pretrain",
            *overrides[1:],
            f"hydra.run.dir={tmp_path / 'bad'}",
            "data.image_size=72",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "not a multiple of the encoder's total stride 32" in bad.stdout + bad.stderr


def _standin_cli(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
    multirun: bool = False,
):
    command = [
        *(launcher or [sys.executable]),
        str(HERE / "_launch_cli.py"),
        *(["--multirun"] if multirun else []),
        *TINY,
        "logger.progress_bar=false",
        *args,
    ]
    return subprocess.run(command, cwd=cwd, env=env or _env(standin=True), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["standin", "custom"])
def test_torchrun_two_gloo_ranks_stay_identical_and_share_one_run_dir(tmp_path: Path, model: str) -> None:
    """2 gloo ranks under torchrun: the stand-in, and a real sparse ResNet-10 (``model=custom``, 64 px)."""
    env = {**_env(standin=model == "standin"), "SPARKME_TEST_DUMP": str(tmp_path)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["train.batch_size=4", "train.epochs=2"]
    if model == "custom":
        args += ["model=custom", "data.image_size=64", "reconstruction.every_epochs=0"]
    done = _standin_cli(args, cwd=tmp_path, env=env, launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "pretrain").iterdir())
    assert len(runs) == 1, runs
    assert (runs[0] / "checkpoints" / "last.pth").is_file() and (runs[0] / ".hydra" / "config.yaml").is_file()
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    from sparkme.training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(runs[0] / "checkpoints" / "last.pth")
    assert checkpoint["step"] == 6  # 12 images / global batch 4 = 3 steps per epoch, 2 ranks x 2 images
    assert all(torch.equal(checkpoint["model"][k], rank0[k]) for k in rank0)
    log_text = (runs[0] / "pretrain.log").read_text()
    assert "world size 2" in log_text and log_text.count("sparkme pretraining") == 1


@pytest.mark.slow
def test_multirun_sweep(tmp_path: Path) -> None:
    done = _standin_cli(
        ["train.seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", "train.epochs=1"], cwd=tmp_path, multirun=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "checkpoints" / "last.pth").is_file()
    weights = [
        torch.load(tmp_path / "sweep" / j / "checkpoints" / "last.pth", weights_only=True)["model"] for j in "01"
    ]
    assert not torch.equal(weights[0]["decoder.weight"], weights[1]["decoder.weight"])


def _pretrain_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, *overrides: str) -> tuple[str, str]:
    """``sparkme.cli.pretrain.run`` on the stand-in model, a log file attached the way Hydra attaches
    ``pretrain.log``; returns (stderr, log text) after the run stops with exit status 1."""
    import sparkme.training.trainer as trainer_module
    from sparkme.cli.pretrain import run

    monkeypatch.setattr(trainer_module, "build_spark", lambda *args, **kwargs: StandInSpark())
    handler = logging.FileHandler(tmp_path / "pretrain.log")
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run(tiny("logger=none", *overrides), tmp_path / "run")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert exit_info.value.code == 1
    return capsys.readouterr().err, (tmp_path / "pretrain.log").read_text()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.accum_steps=0", "train.accum_steps must be a whole number >= 1, got 0"),
        ("train.batch_size=0", "train.batch_size (the global batch over all ranks and accumulation steps) must be "
         "a whole number >= 1, got 0"),
        ("train.batch_size=6", "train.batch_size=6 (the global batch) is not a multiple of world size 1 x "
         "train.accum_steps 4 = 4; use e.g. train.batch_size=4 or 8"),
        ("train.device=cuda", "train.device=cuda but this machine has no usable CUDA GPU"),
    ],
)  # fmt: skip
def test_bad_train_settings_are_one_line_in_stderr_and_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, override: str, message: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra = ["train.accum_steps=4"] if override == "train.batch_size=6" else []
    err, log_text = _pretrain_error(tmp_path, monkeypatch, capsys, override, *extra)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sparkme-pretrain: error: {message}"), lines
    assert "Traceback" not in err and lines[0] in log_text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unset_data_root_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    err, log_text = _pretrain_error(tmp_path, monkeypatch, capsys, "data=imagefolder")
    assert err.splitlines() == [
        "sparkme-pretrain: error: data.root must be set: add data.root=... to the command line "
        "(e.g. data=imagefolder data.root=/path/to/images)"
    ]
    assert err.strip() in log_text


def test_folder_of_truncated_jpegs_stops_the_cli_before_training(tmp_path: Path) -> None:
    """The real command line: one line on stderr, the same line in pretrain.log, no traceback, no checkpoint."""
    from test_data import _write_undecodable_folder

    _write_undecodable_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    args = [
        "data=imagefolder",
        f"data.root={tmp_path / 'images'}",
        "data.num_workers=0",
        "data.image_size=32",
        "train.batch_size=4",
        "train.device=cpu",
        "logger.progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(
        [sys.executable, str(HERE / "_launch_cli.py"), *args],
        cwd=tmp_path,
        env=_env(standin=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparkme-pretrain: error: none of the 3 image files under"), lines
    assert "can be decoded (truncated or corrupt" in lines[0] and "Traceback" not in done.stdout + done.stderr
    assert lines[0] in (run_dir / "pretrain.log").read_text()
    assert not (run_dir / "checkpoints").exists()
