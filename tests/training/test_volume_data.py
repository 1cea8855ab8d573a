"""Demo volumes, volume folders with bad files, intensity normalisation and the 3D crop."""

from __future__ import annotations

import logging
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sparkme.data import (
    DemoVolumeDataset,
    SeededTransformDataset,
    VolumeFolderDataset,
    normalize_intensity,
    read_volume,
    volume_eval_transform,
    volume_pretrain_transform,
)
from sparkme.data.volume_demo import render_demo_volume
from sparkme.errors import UserError


def test_demo_volumes_are_deterministic_normalised_and_labelled() -> None:
    data = DemoVolumeDataset(length=12, volume_size=24, seed=3)
    volume, label = data[5]
    again, label_again = DemoVolumeDataset(length=12, volume_size=24, seed=3)[5]
    assert volume.shape == (1, 24, 24, 24) and volume.dtype == torch.float32
    assert torch.equal(volume, again) and label == label_again
    assert not torch.equal(volume, DemoVolumeDataset(length=12, volume_size=24, seed=4)[5][0])
    assert not torch.equal(volume, data[6][0])
    values = volume.double()
    assert abs(values.mean().item()) < 1e-5 and abs(values.std(unbiased=False).item() - 1) < 1e-4
    labels = [data[i][1] for i in range(12)]
    assert set(labels) <= set(range(data.num_classes)) and len(set(labels)) >= 3
    assert len(data.classes) == data.num_classes
    with pytest.raises(IndexError):
        data[12]
    with pytest.raises(ValueError, match="volume_size"):
        DemoVolumeDataset(volume_size=4)
    with pytest.raises(ValueError, match="length"):
        DemoVolumeDataset(length=0)


def test_demo_volumes_hold_smooth_structure_not_noise() -> None:
    """Neighbouring voxels correlate strongly along every axis, and objects stand out of the background."""
    raw, _ = render_demo_volume(seed=0, index=1, volume_size=48)
    assert raw.dtype == np.float32 and raw.shape == (48, 48, 48)
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    centred = raw.astype(np.float64) - raw.mean()
    for axis in range(3):
        ahead = np.moveaxis(centred, axis, 0)
        correlation = (ahead[1:] * ahead[:-1]).mean() / (ahead**2).mean()
        assert correlation > 0.8, f"axis {axis}: lag-1 correlation {correlation:.3f}"
    spread = [np.ptp(render_demo_volume(0, index, 32)[0]) for index in range(4)]
    assert min(spread) > 0.3  # objects of their own intensity, not a flat field


def test_normalisation_matches_a_float64_reference_per_channel() -> None:
    rng = np.random.default_rng(0)
    volume = np.stack([rng.gamma(2.0, 50.0, (9, 10, 11)), np.full((9, 10, 11), 7.0)]).astype(np.float32)
    volume[0, 0, 0, :3] = [1e6, -1e6, 5e5]  # outliers the percentile clip removes
    out = normalize_intensity(volume, (0.5, 99.5))
    reference = volume[0].astype(np.float64)
    low, high = np.percentile(reference, [0.5, 99.5])
    reference = np.clip(reference, low, high)
    reference = (reference - reference.mean()) / reference.std()
    assert out.dtype == np.float32 and out.shape == volume.shape
    np.testing.assert_allclose(out[0], reference, atol=1e-5, rtol=0)
    assert np.array_equal(out[1], np.zeros_like(out[1]))  # a constant channel has no scale
    unclipped = normalize_intensity(volume, None)[0]
    assert unclipped.max() > 10  # without the clip the outlier dominates
    scaled = normalize_intensity(volume[:1] * 3 + 11, None)[0]
    np.testing.assert_allclose(scaled, unclipped, atol=1e-4)


def test_crop_is_a_window_flip_is_a_flip_and_padding_uses_the_minimum() -> None:
    volume = torch.arange(2 * 20 * 18 * 16, dtype=torch.float32).reshape(2, 20, 18, 16)
    torch.manual_seed(0)
    crop = volume_pretrain_transform(12, flip=0.0)(volume)
    d, h, w = (int(i) for i in torch.nonzero(volume[0] == crop[0, 0, 0, 0])[0])
    assert torch.equal(crop, volume[:, d : d + 12, h : h + 12, w : w + 12])
    cube = volume[:, :16, :16, :16]
    assert torch.equal(volume_pretrain_transform(16, flip=1.0)(cube), cube.flip(1, 2, 3))
    assert torch.equal(volume_pretrain_transform(16, flip=0.0)(cube), cube)
    small = torch.stack([torch.full((3, 8, 5), 2.0), torch.full((3, 8, 5), -4.0)])
    small[:, 1, 4, 2] = 9.0
    padded = volume_eval_transform(8)(small)
    assert padded.shape == (2, 8, 8, 8)
    assert torch.equal(padded[:, 2:5, :, 1:6], small)  # centred: 5 missing -> 2 before; 3 -> 1 before
    assert padded[0, 0].unique().tolist() == [2.0] and padded[1, 0].unique().tolist() == [-4.0]
    with pytest.raises(ValueError, match=r"\[C, D, H, W\]"):
        volume_eval_transform(8)(small[0])


def test_seeded_crops_are_reproducible_and_differ_between_seeds() -> None:
    data = SeededTransformDataset(DemoVolumeDataset(length=4, volume_size=24), volume_pretrain_transform(16))
    first, label = data[(2, 11)]
    torch.manual_seed(123)  # the global RNG must not matter
    assert first.shape == (1, 16, 16, 16) and torch.equal(first, data[(2, 11)][0])
    assert label == DemoVolumeDataset(length=4, volume_size=24)[2][1]
    assert any(not torch.equal(first, data[(2, seed)][0]) for seed in (12, 13, 14))


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def test_folder_reads_npy_npz_nested_and_normalises(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    plain = rng.normal(100, 20, (6, 7, 8)).astype(np.float32)
    _save(tmp_path / "a.npy", plain)
    _save(tmp_path / "sub" / "deeper" / "b.npy", rng.integers(0, 4000, (1, 5, 9, 4)).astype(np.int16))
    np.savez_compressed(tmp_path / "sub" / "c.npz", rng.random((4, 4, 4)))
    np.savez(tmp_path / "d.npz", volume=rng.random((3, 3, 3)), label=np.zeros((3, 3, 3)))
    (tmp_path / "notes.txt").write_text("not a volume")
    data = VolumeFolderDataset(tmp_path)
    assert [p.name for p in data.files] == ["a.npy", "d.npz", "c.npz", "b.npy"]
    assert data.channels == 1 and len(data) == 4 and data.skipped == []
    shapes = [tuple(data[i][0].shape) for i in range(4)]
    assert shapes == [(1, 6, 7, 8), (1, 3, 3, 3), (1, 4, 4, 4), (1, 5, 9, 4)]
    volume, label = data[0]
    assert label == 0 and volume.dtype == torch.float32
    np.testing.assert_allclose(volume.numpy(), normalize_intensity(plain[None]), atol=1e-6)
    cropped = VolumeFolderDataset(tmp_path, transform=volume_eval_transform(8))
    assert all(cropped[i][0].shape == (1, 8, 8, 8) for i in range(4))
    with pytest.raises(IndexError):
        data[4]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(UserError, match=r"no readable volume found .*1 other files"):
        VolumeFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VolumeFolderDataset(tmp_path / "missing")


def _bad_file(kind: str, folder: Path) -> Path:
    """One file of a troublesome ``kind``, among a good volume."""
    _save(folder / "good.npy", np.ones((4, 4, 4), np.float32))
    path = folder / f"{kind}.npy"
    if kind == "garbage":
        path.write_bytes(b"\x93NUMPY but then nonsense" * 3)
    elif kind == "truncated":
        _save(path, np.ones((8, 8, 8), np.float32))
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "flat":
        _save(path, np.ones((8, 8), np.float32))
    elif kind == "five_dims":
        _save(path, np.ones((1, 1, 4, 4, 4), np.float32))
    elif kind == "complex":
        _save(path, np.ones((4, 4, 4), np.complex64))
    elif kind == "empty":
        _save(path, np.ones((0, 4, 4), np.float32))
    elif kind == "bad_zip":
        path = folder / "bad_zip.npz"
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif kind == "ambiguous_npz":
        path = folder / "ambiguous_npz.npz"
        np.savez(path, first=np.ones((4, 4, 4)), second=np.ones((4, 4, 4)))
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("garbage", "cannot read volume"),
        ("truncated", "truncated"),
        ("flat", "2 dimensions"),
        ("five_dims", "5 dimensions"),
        ("complex", "not real numbers"),
        ("empty", "is empty"),
        ("bad_zip", "BadZipFile"),
        ("ambiguous_npz", r"holds arrays \['first', 'second'\]"),
    ],
)
def test_bad_file_fails_the_build_naming_it_or_is_skipped(kind: str, message: str, tmp_path: Path) -> None:
    path = _bad_file(kind, tmp_path)
    with pytest.raises(UserError, match=message) as error:
        VolumeFolderDataset(tmp_path)
    assert path.name in str(error.value)
    data = VolumeFolderDataset(tmp_path, skip_bad=True)
    assert [p.name for p in data.files] == ["good.npy"] and [Path(p).name for p, _ in data.skipped] == [path.name]


def test_npz_key_picks_the_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "pair.npz", first=np.zeros((2, 3, 4)), second=np.ones((5, 3, 4)))
    assert VolumeFolderDataset(tmp_path, npz_key="second")[0][0].shape == (1, 5, 3, 4)
    with pytest.raises(UserError, match="not key 'third'"):
        VolumeFolderDataset(tmp_path, npz_key="third")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_an_error_naming_the_file(bad_value: float, tmp_path: Path) -> None:
    volume = np.ones((4, 4, 4), np.float32)
    volume[1, 2, 3] = bad_value
    _save(tmp_path / "a_bad.npy", volume)
    _save(tmp_path / "b_good.npy", np.arange(64, dtype=np.float32).reshape(4, 4, 4))
    data = VolumeFolderDataset(tmp_path)  # values are read with the volume, not at build time
    with pytest.raises(UserError, match=r"'.*a_bad.npy' has 1 NaN or infinite voxels"):
        data[0]
    with pytest.raises(UserError, match="a_bad.npy"):
        VolumeFolderDataset(tmp_path, verify=True)
    with pytest.raises(UserError, match="a_bad.npy"):
        read_volume(tmp_path / "a_bad.npy")


def test_skip_bad_replaces_a_bad_volume_and_lists_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path / "a_bad.npy", np.full((4, 4, 4), np.nan, np.float32))
    good = _save(tmp_path / "b_good.npy", np.arange(64, dtype=np.float32).reshape(4, 4, 4))
    data = VolumeFolderDataset(tmp_path, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        volume, _ = data[0]
    np.testing.assert_allclose(volume.numpy(), normalize_intensity(np.load(good)[None]), atol=1e-6)
    assert "a_bad.npy" in caplog.text and [Path(p).name for p, _ in data.skipped] == ["a_bad.npy"]
    good.unlink()
    _save(tmp_path / "b_good.npy", np.full((4, 4, 4), np.inf, np.float32))
    with pytest.raises(UserError, match="none of the 2 volumes"):
        VolumeFolderDataset(tmp_path, skip_bad=True, verify=True)


def test_mixed_channel_counts_are_an_error_naming_both(tmp_path: Path) -> None:
    _save(tmp_path / "one.npy", np.ones((4, 4, 4), np.float32))
    _save(tmp_path / "two.npy", np.ones((2, 4, 4, 4), np.float32))
    for skip_bad in (False, True):
        with pytest.raises(UserError, match=r"1 channels: 1 files, e.g. '.*one.npy'; 2 channels: 1 files, e.g. "):
            VolumeFolderDataset(tmp_path, skip_bad=skip_bad)


def _fake_nibabel(array: np.ndarray) -> types.ModuleType:
    """A stand-in for nibabel's ``load``: an image with ``shape``, ``get_data_dtype`` and ``dataobj``."""
    module = types.ModuleType("nibabel")
    image = types.SimpleNamespace(shape=array.shape, dataobj=array, get_data_dtype=lambda: array.dtype)
    module.load = lambda path: image
    return module


def test_nifti_without_nibabel_names_the_file_and_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "scan.nii.gz").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel raises ImportError
    with pytest.raises(UserError, match=r"'.*scan.nii.gz' is a NIfTI volume .*pip install nibabel"):
        VolumeFolderDataset(tmp_path)


def test_nifti_channels_last_are_moved_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    array = np.random.default_rng(0).random((5, 6, 7, 2)).astype(np.float32)
    (tmp_path / "scan.nii").write_bytes(b"read by the stand-in")
    monkeypatch.setitem(sys.modules, "nibabel", _fake_nibabel(array))
    data = VolumeFolderDataset(tmp_path, clip_percentiles=None)
    assert data.channels == 2
    volume, _ = data[0]
    np.testing.assert_allclose(volume.numpy(), normalize_intensity(np.moveaxis(array, 3, 0), None), atol=1e-6)


def test_real_nifti_round_trip(tmp_path: Path) -> None:
    nibabel = pytest.importorskip("nibabel")
    array = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), tmp_path / "scan.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "scan.nii.gz"), array[None])
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(UserError, match="broken.nii.gz"):
        VolumeFolderDataset(tmp_path)


def test_zip_that_loses_its_member_data_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.npz"
    np.savez_compressed(path, np.random.default_rng(0).random((16, 16, 16)))
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["arr_0.npy"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="cut.npz"):
        VolumeFolderDataset(tmp_path)


def test_data_configs_build_the_volume_datasets(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module

    from sparkme.training.build import instantiate_unwrapped

    _save(tmp_path / "scan.npy", np.ones((2, 5, 5, 5), np.float32))
    with initialize_config_module(config_module="sparkme.conf", version_base="1.3"):
        demo = compose(config_name="pretrain", overrides=["data=demo3d", "data.volume_size=16"]).data
        folder = compose(config_name="pretrain", overrides=["data=volumefolder", f"data.root={tmp_path}"]).data
    demo_set = instantiate_unwrapped(demo.dataset, transform=None)
    assert isinstance(demo_set, DemoVolumeDataset) and len(demo_set) == 64 and demo_set[0][0].shape == (1, 16, 16, 16)
    folder_set = instantiate_unwrapped(folder.dataset, transform=volume_pretrain_transform(folder.volume_size))
    assert isinstance(folder_set, VolumeFolderDataset) and folder_set.clip_percentiles == (0.5, 99.5)
    assert folder_set[0][0].shape == (2, 96, 96, 96) and folder.flip == 0.5
