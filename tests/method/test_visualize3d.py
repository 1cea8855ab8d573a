"""Reconstruction pictures for volumes: middle slices, the per-epoch PNG and sparkme-visualize on volume files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import sparkme.training.checkpoint
from sparkme.cli.visualize import load_volumes, main, save_reconstruction_grid
from sparkme.data.volume_demo import DemoVolumeDataset
from sparkme.method import SparK
from sparkme.training.reconstructions import reconstruction_png, slice_views


@pytest.fixture
def volume_model(stand_in_volume_encoder):
    return SparK(stand_in_volume_encoder(), decoder_width=16).eval()


def test_slice_views_are_middle_slices_scaled_by_the_input_range(volume_model):
    volumes = torch.randn(2, 1, 16, 24, 32, generator=torch.Generator().manual_seed(0)) * 3 + 5
    out = volume_model.reconstruct(volumes, generator=torch.Generator().manual_seed(1))
    views = slice_views(out, coronal=True)
    assert all(views[key].shape == (4, 1, 24, 32) for key in ("input", "masked", "reconstruction"))
    low = volumes.flatten(1).amin(1).view(2, 1, 1, 1)
    high = volumes.flatten(1).amax(1).view(2, 1, 1, 1)
    axial = (volumes[:, :, 8] - low) / (high - low)
    coronal = (volumes[:, :, :, 12] - low) / (high - low)
    assert torch.allclose(views["input"][0::2], axial, atol=1e-6)
    assert torch.allclose(views["input"][1::2, :, :16], coronal, atol=1e-6)
    assert torch.count_nonzero(views["input"][1::2, :, 16:]) == 0  # the shorter coronal view padded black
    hidden = out["mask"][:, 1].repeat_interleave(8, 1).repeat_interleave(8, 2)  # axial slice 8 is in cube row 1
    assert torch.all(views["masked"][0::2, 0][hidden] == 0.5)
    assert torch.equal(views["masked"][0::2, 0][~hidden], views["input"][0::2, 0][~hidden])
    assert views["reconstruction"].min() >= 0 and views["reconstruction"].max() <= 1
    assert slice_views(out)["input"].shape == (2, 1, 24, 32)


def test_epoch_png_for_volumes(volume_model):
    dataset = DemoVolumeDataset(length=3, volume_size=20, seed=0)
    png = reconstruction_png(volume_model, dataset, image_size=16, count=2, seed=0)
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG"
        assert picture.size == (4 * (16 + 2) + 2, 3 * (16 + 2) + 2)  # 2 volumes x (axial, coronal); 3 rows
    assert reconstruction_png(volume_model, dataset, image_size=16, count=2, seed=0) == png
    assert reconstruction_png(volume_model, dataset, image_size=16, count=2, seed=1) != png
    axial_only = reconstruction_png(volume_model, dataset, image_size=16, count=2, seed=0, coronal=False)
    with Image.open(io.BytesIO(axial_only)) as picture:
        assert picture.size == (2 * (16 + 2) + 2, 3 * (16 + 2) + 2)


def test_grid_for_volumes_has_three_rows_and_a_column_per_view(volume_model, tmp_path):
    out = volume_model.reconstruct(torch.randn(3, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    path = save_reconstruction_grid(out, tmp_path / "slices.png", titles=["a", "b", "c"], cell_inches=1.0, coronal=True)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (600, 300)  # 3 volumes x 2 views, 3 rows of 1 inch


def _write_volumes(tmp_path, count: int = 2) -> list[str]:
    paths = []
    for index in range(count):
        volume = np.random.default_rng(index).normal(100.0, 20.0, size=(20, 18, 24)).astype(np.float32)
        paths.append(str(tmp_path / f"scan{index}.npy"))
        np.save(paths[-1], volume)
    return paths


def test_load_volumes_normalizes_and_centre_crops(tmp_path):
    volumes = load_volumes(_write_volumes(tmp_path), 16)
    assert volumes.shape == (2, 1, 16, 16, 16)
    assert abs(volumes.mean().item()) < 0.1 and 0.8 < volumes.std().item() < 1.2  # z-scored, not raw intensities


def test_cli_writes_slices_for_volume_files(volume_model, tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "last.pth"
    checkpoint.write_bytes(b"stand-in")
    monkeypatch.setattr(sparkme.training.checkpoint, "load_spark", lambda path, map_location: volume_model)
    out = tmp_path / "slices.png"
    argv = [str(checkpoint), *_write_volumes(tmp_path), "--out", str(out), "--image-size", "16", "--coronal"]
    assert main(argv) == 0
    assert "2 volumes" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.size == (800, 600)  # 2 volumes x 2 views of 2 inches, 3 rows
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    assert main([str(checkpoint), str(tmp_path / "photo.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds a 3D model: give it volume files" in capsys.readouterr().err
