"""Demo images, image folders with bad files, augmentation and resumable sampling."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparkme.data import DemoDataset, ImageFolderDataset, ResumableSampler, SeededTransformDataset, pretrain_transform
from sparkme.data.folder import load_rgb
from sparkme.errors import UserError


def test_demo_is_deterministic_rgb_and_labelled() -> None:
    data = DemoDataset(length=12, image_size=48, seed=3)
    image, label = data[5]
    again, label_again = DemoDataset(length=12, image_size=48, seed=3)[5]
    assert image.mode == "RGB" and image.size == (48, 48)
    assert np.array_equal(np.asarray(image), np.asarray(again)) and label == label_again
    other, _ = DemoDataset(length=12, image_size=48, seed=4)[5]
    assert not np.array_equal(np.asarray(image), np.asarray(other))
    labels = {data[i][1] for i in range(12)}
    assert labels <= set(range(data.num_classes)) and len(labels) >= 3
    assert len(data.classes) == data.num_classes
    with pytest.raises(IndexError):
        data[12]


def _write_mixed_folder(root: Path) -> dict[str, Path]:
    """Good images plus every troublesome kind the folder reader must handle."""
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {}
    files["good_jpg"] = root / "good.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(files["good_jpg"], quality=90)
    files["good_png"] = root / "sub" / "good.png"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(files["good_png"])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
    files["truncated"] = root / "sub" / "truncated.jpg"
    files["truncated"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    files["text"] = root / "notes.txt"
    files["text"].write_text("not an image\n")
    files["fake_jpg"] = root / "fake.jpg"
    files["fake_jpg"].write_bytes(b"\x00" * 100)
    files["png16"] = root / "sub" / "deeper" / "grey16.png"
    Image.fromarray(np.full((40, 40), 65535, np.uint16).copy()).save(files["png16"])
    files["cmyk"] = root / "cmyk.jpg"
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(files["cmyk"])
    files["palette"] = root / "palette.png"
    Image.new("RGB", (40, 40), (0, 0, 255)).convert("P").save(files["palette"])
    files["rgba"] = root / "rgba.png"
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(files["rgba"])
    files["exif"] = root / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (60, 30), (0, 200, 0)).save(files["exif"], exif=exif)
    return files


def test_folder_reads_every_mode_and_skips_bad_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = _write_mixed_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        data = ImageFolderDataset(tmp_path)
    skipped_at_scan = {Path(p).name for p, _ in data.skipped}
    assert skipped_at_scan == {"notes.txt", "fake.jpg"}
    assert "notes.txt" in caplog.text
    assert len(data) == 8  # the truncated JPEG has a valid header: found only when decoded
    images = [data[i][0] for i in range(len(data))]
    assert all(image.mode == "RGB" for image in images)
    assert {Path(p).name for p, _ in data.skipped} == {"notes.txt", "fake.jpg", "truncated.jpg"}
    assert np.asarray(load_rgb(files["png16"]))[0, 0].tolist() == [255, 255, 255]  # 16-bit white stays white
    assert np.asarray(load_rgb(files["rgba"]))[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert np.asarray(load_rgb(files["palette"]))[0, 0].tolist() == [0, 0, 255]
    cmyk = np.asarray(load_rgb(files["cmyk"]))[0, 0]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # C=0, M=Y=full: red
    assert load_rgb(files["exif"]).size == (30, 60)  # EXIF rotation applied


def test_folder_without_images_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no readable image"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")


def test_transform_and_sampler_resume_mid_epoch() -> None:
    data = SeededTransformDataset(DemoDataset(length=10, image_size=40), pretrain_transform(32))
    sampler = ResumableSampler(data, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip(4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip applies to one epoch only
    sampler.set_epoch(3)
    assert list(sampler) != full
    first = data[full[0]][0]
    torch.manual_seed(123)  # global RNG must not matter
    assert first.shape == (3, 32, 32) and torch.equal(first, data[full[0]][0])
    assert not torch.equal(first, data[(full[0][0], full[0][1] + 1)][0])  # another seed, another crop


def test_distributed_sampler_shards_are_disjoint() -> None:
    data = SeededTransformDataset(DemoDataset(length=10, image_size=40), pretrain_transform(32))
    shards = [{i for i, _ in ResumableSampler(data, num_replicas=2, rank=r, seed=0)} for r in (0, 1)]
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 5


def _write_undecodable_folder(root: Path, count: int = 3) -> None:
    """JPEGs whose headers are valid but whose data is cut off or destroyed."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
        data = buffer.getvalue()
        (root / f"truncated_{index}.jpg").write_bytes(data[: len(data) // 3])
    (root / "header_only.jpg").write_bytes(data[:200])  # too short to be recognised: not an image


def test_folder_of_only_undecodable_images_fails_when_built(tmp_path: Path) -> None:
    _write_undecodable_folder(tmp_path)
    message = r"none of the 3 image files .* can be decoded \(truncated or corrupt; first: truncated_0.jpg: .*; 1 other"
    with pytest.raises(UserError, match=message):
        ImageFolderDataset(tmp_path)


def test_bad_first_file_of_a_mixed_folder_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_undecodable_folder(tmp_path, count=1)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "zz_good.png")
    with caplog.at_level(logging.WARNING):
        data = ImageFolderDataset(tmp_path)
    assert "truncated_0.jpg: failed to decode" in caplog.text and "header_only.jpg" in caplog.text
    assert [np.asarray(data[i][0])[0, 0].tolist() for i in range(len(data))] == [[9, 9, 9]] * len(data)


def test_symlinks_are_followed_once_per_real_file(tmp_path: Path) -> None:
    """A link loop and a second link to a folder must not multiply the 23 images."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    for index in range(23):
        folder = [tmp_path, tmp_path / "a", tmp_path / "a" / "b"][index % 3]
        Image.new("RGB", (8, 8), (index, 0, 0)).save(folder / f"{index:02d}.png")
    (tmp_path / "a" / "b" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "alias_of_a").symlink_to(tmp_path / "a", target_is_directory=True)
    assert len(ImageFolderDataset(tmp_path)) == 23
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (99, 0, 0)).save(outside / "extra.png")
    (tmp_path / "a" / "linked_out").symlink_to(outside, target_is_directory=True)
    data = ImageFolderDataset(tmp_path)
    assert len(data) == 24  # 23 + the one image reached only through a link
    reds = sorted(np.asarray(data[i][0])[0, 0, 0] for i in range(len(data)))
    assert reds == [*range(23), 99]
