"""sparkme-export on a checkpoint laid out per the training contract (built by hand here)."""

from __future__ import annotations

import pickle

import pytest
import torch

from sparkme.cli.export import main
from sparkme.converters import read_encoder


@pytest.fixture()
def checkpoint(resnet18, tmp_path):
    """A sparkme-style checkpoint: SparK state, dense encoder (timm keys) and the model config."""
    encoder = {key: value for key, value in resnet18.state_dict().items() if not key.startswith("fc.")}
    payload = {
        "model": {"decoder.dec.0.weight": torch.zeros(2, 2), **{"encoder." + k: v for k, v in encoder.items()}},
        "encoder": encoder,
        "model_name": "resnet18",
        "model_cfg": {"_target_": "timm.create_model", "model_name": "resnet18", "pretrained": False},
        "spark_cfg": {"mask_ratio": 0.6},
        "config": "model:\n  model_name: resnet18\n",
        "optimizer": {},
        "epoch": 1,
        "step": 10,
        "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)},
        "sparkme_version": "0.1.0",
    }
    path = tmp_path / "last.pth"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    ("format", "suffix"),
    [
        ("timm", ".pth"),
        ("safetensors", ".safetensors"),
        ("torchvision", ".pth"),
        ("detectron2", ".pkl"),
        ("mmdet", ".pth"),
    ],
)
def test_every_format_writes_and_reports(format, suffix, checkpoint, tmp_path, capsys):
    out = tmp_path / f"exported{suffix}"
    assert main([str(checkpoint), "--format", format, "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 1_000_000
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "resnet18" in printed
    if format == "detectron2":
        assert "STRIDE_IN_1X1: False" in printed and "num_batches_tracked" in printed
        assert f'MODEL.WEIGHTS: "{out}"' in printed
        with open(out, "rb") as handle:
            assert "res5.1.conv2.norm.running_var" in pickle.load(handle)["model"]


def test_encoder_safetensors_reads_model_name_from_metadata(checkpoint, tmp_path, capsys):
    from safetensors.torch import save_file

    encoder, _ = read_encoder(checkpoint)
    sibling = tmp_path / "last.encoder.safetensors"
    save_file(encoder, str(sibling), metadata={"model_name": "resnet18", "format": "timm"})
    out = tmp_path / "tv.pth"
    assert main([str(sibling), "--format", "torchvision", "--out", str(out)]) == 0
    assert set(torch.load(out, weights_only=True)) == set(encoder)  # resnet18 trunk == torchvision minus fc


def test_plain_state_dict_needs_a_model_name(resnet18, tmp_path, capsys):
    plain = tmp_path / "plain.pth"
    torch.save(resnet18.state_dict(), plain)
    assert main([str(plain), "--format", "timm", "--out", str(tmp_path / "o.pth")]) == 2
    assert "pass --model-name" in capsys.readouterr().err
    assert main([str(plain), "--format", "timm", "--out", str(tmp_path / "o.pth"), "--model-name", "resnet18"]) == 0
    assert "fc.weight  (classifier head" in capsys.readouterr().out


def test_bad_inputs_are_clear_errors(checkpoint, tmp_path, capsys):
    assert main([str(tmp_path / "nope.pth"), "--format", "timm", "--out", str(tmp_path / "o.pth")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert main([str(garbage), "--format", "timm", "--out", str(tmp_path / "o.pth")]) == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err
    assert main([str(checkpoint), "--format", "mmdet", "--out", str(tmp_path / "o.pth"), "--model-name", "vgg11"]) == 2
    assert "no mmdet mapping" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "o.onnx")])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparkme-export: error: ") and "Traceback" not in err, err
    return lines[0]


def test_truncated_safetensors_is_a_one_line_error(checkpoint, tmp_path, capsys):
    from safetensors.torch import save_file

    encoder, _ = read_encoder(checkpoint)
    full = tmp_path / "full.safetensors"
    save_file(encoder, str(full), metadata={"model_name": "resnet18", "format": "timm"})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert main([str(cut), "--format", "timm", "--out", str(tmp_path / "o.pth")]) == 2
    assert f"{cut} is not a readable safetensors file, truncated or damaged" in _one_error_line(capsys)
    assert not (tmp_path / "o.pth").exists()


def test_out_must_name_a_file_with_the_formats_suffix(checkpoint, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main([str(checkpoint), "--format", "timm", "--out", str(folder)]) == 2
    line = _one_error_line(capsys)
    assert f"--out {folder} is a folder; name the file to write, e.g. --out {folder / 'resnet18'}_spark.pth" in line
    cases = [
        ("safetensors", "x.pth", ".safetensors"),
        ("detectron2", "x.pth", ".pkl"),
        ("timm", "x.safetensors", ".pth"),
    ]
    for format, name, suffix in cases:
        out = tmp_path / name
        assert main([str(checkpoint), "--format", format, "--out", str(out)]) == 2
        line = _one_error_line(capsys)
        assert f"--format {format} writes a {suffix} file but --out {out} ends in {out.suffix}" in line
        assert line.endswith(f"use --out {out.with_suffix(suffix)}")
    assert main([str(checkpoint), "--format", "timm", "--out", str(tmp_path / "noext")]) == 2
    assert "ends in no suffix" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "last.pth"]  # nothing written
    assert main([str(checkpoint), "--format", "timm", "--out", str(tmp_path / "x.pt")]) == 0  # any torch suffix
