"""sparkme-visualize: the plotting function and the CLI's errors."""

from __future__ import annotations

import torch
from PIL import Image

from sparkme.cli.visualize import load_images, main, save_reconstruction_grid
from sparkme.method import SparK


def test_grid_png_has_three_rows_and_one_column_per_image(stand_in_encoder, tmp_path):
    model = SparK(stand_in_encoder(), decoder_width=32).eval()
    result = model.reconstruct(torch.randn(3, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    out = save_reconstruction_grid(result, tmp_path / "sub" / "grid.png", cell_inches=1.0, titles=["a", "b", "c"])
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (300, 300)  # 3 columns x 3 rows of 1 inch at 100 dpi


def test_load_images_resizes_crops_and_normalizes(tmp_path):
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "red.png")
    images = load_images([tmp_path / "red.png"], 32)
    assert images.shape == (1, 3, 32, 32)
    red = torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    assert torch.allclose(images[0, :, 0, 0], red, atol=1e-4)


def test_images_are_read_with_the_pretraining_loader(tmp_path):
    """16-bit, transparent and EXIF-rotated images come out as the training loader reads them."""
    import numpy as np

    from sparkme.data.folder import load_rgb
    from sparkme.data.transforms import denormalize, eval_transform

    Image.fromarray(np.full((40, 40), 32896, np.uint16)).save(tmp_path / "grey16.png")  # 32896/65535 = 128/255
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    sideways = Image.new("RGB", (64, 32), (255, 0, 0))
    sideways.paste((0, 0, 255), (32, 0, 64, 32))  # left red, right blue; shown rotated: top red, bottom blue
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    paths = [tmp_path / name for name in ("grey16.png", "clear.png", "rotated.jpg")]
    images = load_images(paths, 32)
    expected = torch.stack([eval_transform(32)(load_rgb(path)) for path in paths])
    assert torch.equal(images, expected)
    pixels = denormalize(images)
    assert torch.allclose(pixels[0], torch.full_like(pixels[0], 128 / 255), atol=1 / 255)  # not clipped to white
    assert torch.allclose(pixels[1], torch.ones_like(pixels[1]), atol=1 / 255)  # alpha on white
    top, bottom = pixels[2][:, 4, 16], pixels[2][:, 28, 16]
    assert top[0] > 0.8 > top[2] and bottom[2] > 0.8 > bottom[0]  # EXIF orientation applied


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparkme-visualize: error: ") and "Traceback" not in err, err
    return lines[0]


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "none.pth"), "x.png", "--out", str(tmp_path / "g.png")]) == 2
    assert "none.pth does not exist" in _one_error_line(capsys)


def test_unreadable_image_is_a_clear_error(tmp_path, capsys):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"not read before the images")
    (tmp_path / "broken.jpg").write_text("this is not a JPEG")
    assert main([str(checkpoint), str(tmp_path / "broken.jpg"), "--out", str(tmp_path / "g.png")]) == 2
    assert "cannot read image" in _one_error_line(capsys) and not (tmp_path / "g.png").exists()


def test_cli_writes_grid_from_a_real_checkpoint(tmp_path, capsys):
    from sparkme.data.demo import DemoDataset
    from sparkme.training.build import build_spark
    from sparkme.training.checkpoint import save_checkpoint

    model_cfg = {"_target_": "timm.create_model", "model_name": "resnet18", "pretrained": False}
    spark_cfg = {"mask_ratio": 0.6, "decoder_width": 64}
    model = build_spark(model_cfg, spark_cfg)
    payload = {"model": model.state_dict(), "model_cfg": model_cfg, "spark_cfg": spark_cfg, "step": 0, "epoch": 0}
    checkpoint = save_checkpoint(tmp_path / "last.pth", payload)
    paths = []
    for index in range(2):
        image, _ = DemoDataset(length=2, image_size=80)[index]
        image.save(tmp_path / f"demo{index}.png")
        paths.append(str(tmp_path / f"demo{index}.png"))
    out = tmp_path / "grid.png"
    argv = [str(checkpoint), *paths, "--out", str(out), "--image-size", "64", "--mask-ratio", "0.5", "--seed", "1"]
    assert main(argv) == 0
    assert "mask ratio 0.5" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (400, 600)  # 2 columns x 3 rows of 2 inches at 100 dpi
