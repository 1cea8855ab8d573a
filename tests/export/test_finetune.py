"""sparkme-finetune: weights loading, splits, linear probe and fine-tuning on tiny inputs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from sparkme.cli.finetune import main
from sparkme.converters import convert, save_export
from sparkme.finetune import (
    FinetuneConfig,
    build_classifier,
    folder_splits,
    resolve_model_name,
    run_finetune,
    train_linear_probe,
)

TINY = dict(train_size=24, val_size=12, image_size=32, batch_size=8)


def test_linear_probe_learns_separable_features():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=generator) * 4
    labels = torch.arange(3).repeat(40)
    features = centers[labels] + torch.randn(120, 16, generator=generator)
    metrics = train_linear_probe(
        (features[:90], labels[:90]), (features[90:], labels[90:]), 3,
        epochs=30, lr=1e-2, weight_decay=0.0, batch_size=16, seed=0,
    )  # fmt: skip
    assert metrics["top1"] > 90 and metrics["train_top1"] > 90
    shuffled = train_linear_probe(
        (features[:90], labels[torch.randperm(90, generator=generator)]), (features[90:], labels[90:]), 3,
        epochs=30, lr=1e-2, weight_decay=0.0, batch_size=16, seed=0,
    )  # fmt: skip
    assert shuffled["top1"] < 70  # labels carry no signal: no better than chance-ish


def test_classifier_from_exported_weights_keeps_the_trunk(resnet18, tmp_path):
    path = save_export(convert(resnet18.state_dict(), "resnet18", "safetensors"), tmp_path / "w.safetensors")
    assert resolve_model_name(path, None) == "resnet18"
    model = build_classifier("resnet18", num_classes=6, weights=path)
    assert model.fc.out_features == 6
    for key, value in resnet18.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="contradicts"):
        resolve_model_name(path, "convnext_atto")
    with pytest.raises(ValueError, match="pass --model"):
        resolve_model_name(None, None)


def test_linear_probe_run_is_deterministic_and_written(tmp_path):
    cfg = FinetuneConfig(model="resnet18", mode="linear", epochs=3, seeds=[0, 1], **TINY)
    first = run_finetune(cfg, out=tmp_path / "r.json")
    again = run_finetune(FinetuneConfig(model="resnet18", mode="linear", epochs=3, seeds=[0, 1], **TINY))
    assert [run["top1"] for run in first["runs"]] == [run["top1"] for run in again["runs"]]
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["model"] == "resnet18" and written["val_images"] == 12 and len(written["runs"]) == 2
    assert 0 <= written["top1_mean"] <= 100 and written["config"]["mode"] == "linear"


def test_finetune_with_mixup_and_layer_decay(resnet18, tmp_path):
    path = save_export(convert(resnet18.state_dict(), "resnet18", "timm"), tmp_path / "w.pth")
    cfg = FinetuneConfig(
        weights=str(path), model="resnet18", mode="finetune", epochs=1, mixup=True, layer_decay=0.75, **TINY
    )
    results = run_finetune(cfg)
    assert 0 <= results["runs"][0]["top1"] <= 100 and results["runs"][0]["final_loss"] > 0


def test_folder_splits(tmp_path):
    for name in ("cats", "dogs"):
        (tmp_path / "flat" / name).mkdir(parents=True)
        for index in range(5):
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(tmp_path / "flat" / name / f"{index}.png")
    splits = folder_splits(tmp_path / "flat", 0.2, 0, None, None)
    assert splits.classes == ["cats", "dogs"] and (len(splits.train), len(splits.val)) == (8, 2)
    again = folder_splits(tmp_path / "flat", 0.2, 0, None, None)
    assert again.val.indices == splits.val.indices  # fixed held-out split across runs
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "split" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "split" / split / name / "x.png")
    assert len(folder_splits(tmp_path / "split", 0.2, 0, None, None).val) == 2
    with pytest.raises(FileNotFoundError):
        folder_splits(tmp_path / "missing", 0.2, 0, None, None)


def test_cli_runs_and_rejects_bad_options(tmp_path, capsys):
    out = tmp_path / "probe.json"
    args = ["--model", "resnet18", "--train-size", "16", "--val-size", "8", "--image-size", "32", "--epochs", "2"]
    assert main([*args, "--out", str(out)]) == 0
    assert "held-out top-1" in capsys.readouterr().out and json.loads(out.read_text())["runs"]
    assert main([*args, "--mixup"]) == 2
    assert "finetune only" in capsys.readouterr().err
    assert main(["--train-size", "16"]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_stage_features_concatenate_every_pooled_stage(resnet18):
    from sparkme.finetune import pooled_features

    images = torch.randn(2, 3, 64, 64)
    stages = pooled_features(resnet18, images, "stages")
    assert stages.shape == (2, 64 + 128 + 256 + 512)
    last = pooled_features(resnet18, images, "last")
    torch.testing.assert_close(stages[:, -512:], last)  # the last stage pooled is the classifier's input
    with pytest.raises(ValueError, match="'last' or 'stages'"):
        FinetuneConfig(model="resnet18", mode="finetune", features="stages")


def _bn_inputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every BatchNorm layer in an eval-mode forward pass (cloned: in-place ReLUs follow)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(lambda module, args, name=name: seen.setdefault(name, args[0].clone()))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model.eval().forward_features(images)
    for handle in handles:
        handle.remove()
    return seen


def test_bn_recalibration_sets_running_stats_to_the_probe_images_statistics(resnet18):
    import copy

    from torch.utils.data import TensorDataset

    from sparkme.finetune import recalibrate_batchnorm

    model = copy.deepcopy(resnet18)  # random running stats (mean +-0.2, var 0.5-1.5) stand in for sparse-image ones
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    dataset = TensorDataset(images, torch.zeros(8, dtype=torch.long))
    stale = _bn_inputs(model, images)
    assert not torch.allclose(model.bn1.running_var, stale["bn1"].var(dim=(0, 2, 3)), rtol=0.1)  # stale stats
    assert recalibrate_batchnorm(model, dataset, batch_size=8) == 20  # resnet18: 20 BatchNorm layers
    assert not model.training and all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # one batch: every layer's running stats are its full-image input statistics (unbiased variance), up to
    # the drift that train-mode (biased, per-batch) normalisation upstream causes at the small deep maps:
    # measured worst 0.11 std / 16% here, vs 6.5 std / a factor e^5.4 for the stale statistics
    for name, inputs in _bn_inputs(model, images).items():
        norm = model.get_submodule(name)
        mean, var = inputs.mean(dim=(0, 2, 3)), inputs.var(dim=(0, 2, 3))
        assert ((norm.running_mean - mean).abs() / var.sqrt()).max() < 0.25, name
        assert (norm.running_var / var).log().abs().max() < 0.3, name
    # several batches: cumulative average (momentum=None), exact for the stem whose input does not depend on BN
    recalibrate_batchnorm(model, dataset, batch_size=4)
    stem = model.conv1(images)
    torch.testing.assert_close(model.bn1.running_mean, stem.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    halves = torch.stack([half.var(dim=(0, 2, 3)) for half in stem.split(4)])
    torch.testing.assert_close(model.bn1.running_var, halves.mean(0), rtol=1e-4, atol=1e-5)


def test_linear_probe_recalibrates_by_default_and_can_opt_out(resnet18, tmp_path, monkeypatch):
    import sparkme.finetune.run as run_module

    calls = []
    real = run_module.recalibrate_batchnorm
    monkeypatch.setattr(run_module, "recalibrate_batchnorm", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = save_export(convert(resnet18.state_dict(), "resnet18", "timm"), tmp_path / "w.pth")
    base = dict(weights=str(path), model="resnet18", mode="linear", epochs=1, **TINY)
    on = run_finetune(FinetuneConfig(**base, seeds=[0, 1]))
    assert len(calls) == 1  # pretrained trunk: recalibrated once, features shared by the seeds
    off = run_finetune(FinetuneConfig(**base, bn_recalibrate=False))
    assert len(calls) == 1 and on["config"]["bn_recalibrate"] and not off["config"]["bn_recalibrate"]
    run_finetune(FinetuneConfig(model="resnet18", mode="linear", epochs=1, seeds=[0, 1], **TINY))
    assert len(calls) == 3  # random init: recalibrated too, once per seed (a new trunk each)
    with pytest.raises(ValueError, match="linear only"):
        FinetuneConfig(model="resnet18", mode="finetune", bn_recalibrate=False)
    assert main(["--model", "resnet18", "--mode", "finetune", "--no-bn-recalibrate"]) == 2


def test_compare_probes_matches_the_cli_runs(resnet18, tmp_path):
    from sparkme.finetune.compare import compare_probes

    path = save_export(convert(resnet18.state_dict(), "resnet18", "safetensors"), tmp_path / "w.safetensors")
    sizes = dict(train_size=16, val_size=8, image_size=32, epochs=3, weight_decay=0.05, batch_size=8)
    results = compare_probes(str(path), [0], **sizes)
    rows = {(r["init"], r["features"], r["bn_recalibrate"]): r["top1"] for r in results["rows"]}
    assert len(rows) == 8
    for weights, features, recalibrate in [(str(path), "last", True), (None, "stages", False)]:
        cfg = FinetuneConfig(weights=weights, model="resnet18", features=features, bn_recalibrate=recalibrate, **sizes)
        expected = round(run_finetune(cfg)["runs"][0]["top1"], 2)
        assert rows["pretrained" if weights else "random", features, recalibrate] == [expected]


def test_compare_probes_command_line_writes_the_json(resnet18, tmp_path, capsys):
    from sparkme.cli.compare_probes import main as compare_main

    path = save_export(convert(resnet18.state_dict(), "resnet18", "safetensors"), tmp_path / "w.safetensors")
    args = ["--weights", str(path), "--seeds", "0", "--train-size", "16", "--val-size", "8", "--image-size", "32"]
    assert compare_main([*args, "--out", str(tmp_path / "probe.json")]) == 0
    results = json.loads((tmp_path / "probe.json").read_text())
    assert results["config"]["train_size"] == 16 and len(results["rows"]) == 8
    assert capsys.readouterr().out.count("recal=") == 8


def test_single_class_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(tmp_path / "data" / "cats" / f"{index}.png")
    assert main(["--model", "resnet18", "--data", str(tmp_path / "data"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "sparkme-finetune: error: classification needs at least two classes, found 1 (cats); "
        "give --data a folder with one subfolder of images per class"
    ]


def test_folder_images_go_through_the_pretraining_loader(tmp_path):
    import numpy as np

    from sparkme.data.folder import load_rgb

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "a" / "grey16.png")  # 32896/65535 = 128/255
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "a" / "clear.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    Image.new("RGB", (12, 6), (0, 200, 0)).save(tmp_path / "b" / "rotated.jpg", exif=exif)
    view = folder_splits(tmp_path, 0.5, 0, None, None).train.dataset
    read = {path.split("/")[-1]: view[index][0] for index, (path, _) in enumerate(view.samples)}
    for index, (path, _) in enumerate(view.samples):
        assert np.array_equal(np.asarray(view[index][0]), np.asarray(load_rgb(path)))
    assert np.asarray(read["grey16.png"])[0, 0].tolist() == [128, 128, 128]  # not clipped to white
    assert np.asarray(read["clear.png"])[0, 0].tolist() == [255, 255, 255]  # alpha on white, as in pretraining
    assert read["rotated.jpg"].size == (6, 12)  # EXIF orientation applied
