"""sparkme-visualize: plot input / masked / reconstruction rows for a pretrained SparK checkpoint.

sparkme-visualize runs/demo/last.pth photo1.jpg photo2.png --out grid.png --mask-ratio 0.6 --seed 0
sparkme-visualize runs/demo3d/last.pth scan1.npy scan2.nii.gz --out slices.png --image-size 64 --coronal

A 3D checkpoint reads volume files and shows grayscale middle slices of each volume.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from sparkme.cli.errors import user_errors
from sparkme.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sparkme.method.masking import upsample_mask

__all__ = ["load_images", "load_volumes", "main", "save_reconstruction_grid"]

VOLUME_SIZE = 64  # default cube side for 3D checkpoints

ROWS = (("input", "input"), ("masked", "masked"), ("reconstruction", "reconstruction"))


def load_images(paths: Sequence[str | Path], image_size: int) -> torch.Tensor:
    """Read images, resize the short side to ``image_size``, centre-crop and normalize: ``[N, 3, S, S]``.

    Reads with the pretraining loader (``read_image``: EXIF orientation, 16-bit, alpha on white)
    and its ``eval_transform`` (ImageNet mean/std), so pixels match training.
    """
    from sparkme.data.folder import read_image
    from sparkme.data.transforms import eval_transform

    transform = eval_transform(image_size)
    return torch.stack([transform(read_image(path)) for path in paths])


def load_volumes(paths: Sequence[str | Path], volume_size: int) -> torch.Tensor:
    """Read volume files as the volume folder loader does (per-channel percentile clip and z-score),
    then centre-crop a ``volume_size`` cube: ``[N, C, S, S, S]``."""
    from sparkme.data.volume_folder import read_volume
    from sparkme.data.volume_transforms import normalize_intensity, volume_eval_transform

    crop = volume_eval_transform(volume_size)
    return torch.stack([crop(torch.from_numpy(normalize_intensity(read_volume(path)))) for path in paths])


def _to_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the normalization: ``[N, 3, H, W]`` -> ``[N, H, W, 3]`` in [0, 1] for matplotlib."""
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images.detach().cpu().float() * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1)


def save_reconstruction_grid(
    result: dict[str, torch.Tensor],
    out: str | Path,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    titles: Sequence[str] | None = None,
    cell_inches: float = 2.0,
    coronal: bool = False,
) -> Path:
    """Write one PNG with rows input / masked / reconstruction and one column per image.

    ``result`` is :meth:`sparkme.SparK.reconstruct`'s output (normalized with ``mean``/``std``). For
    volumes ``[B, C, D, H, W]`` each column is a grayscale middle axial slice (with ``coronal``, each
    volume gets a second column: its middle coronal slice); ``mean``/``std`` are not used then.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result["input"].dim() == 5:
        rows, titles = _volume_rows(result, titles, coronal)
    else:
        rows = _image_rows(result, mean, std)
    count = rows[0][1].shape[0]
    figure, axes = plt.subplots(len(rows), count, figsize=(cell_inches * count, cell_inches * len(rows)), squeeze=False)
    for row, (label, pixels) in enumerate(rows):
        for column in range(count):
            axis = axes[row][column]
            grey = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if pixels.dim() == 3 else {}
            axis.imshow(pixels[column].numpy(), interpolation="nearest", **grey)
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(label)
            if row == 0 and titles is not None:
                axis.set_title(titles[column], fontsize=8)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _image_rows(
    result: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float]
) -> list[tuple[str, torch.Tensor]]:
    """Rows of ``[N, H, W, 3]`` pixels; hidden patches of the masked row mid-grey (0 would be the mean colour)."""
    rows = [(label, _to_pixels(result[key], mean, std)) for key, label in ROWS]
    if "mask" in result:
        masked = rows[1][1]
        grid_h = result["mask"].shape[-2]
        hidden = upsample_mask(result["mask"].cpu(), masked.shape[1] // grid_h)  # patches are square
        rows[1] = (rows[1][0], masked.masked_fill(hidden.unsqueeze(-1), 0.5))
    return rows


def _volume_rows(
    result: dict[str, torch.Tensor], titles: Sequence[str] | None, coronal: bool
) -> tuple[list[tuple[str, torch.Tensor]], list[str] | None]:
    """Rows of ``[N * V, h, w]`` grayscale slices and the column titles (``name axial``/``name coronal``)."""
    from sparkme.training.reconstructions import slice_views

    views = slice_views(result, coronal)
    rows = [(label, views[key][:, 0]) for key, label in ROWS]
    if titles is None:
        return rows, None
    names = ("axial", "coronal") if coronal else ("axial",)
    return rows, [f"{title} {name}" for title in titles for name in names]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparkme-visualize", description="Plot SparK reconstructions (input / masked / reconstruction) as a PNG."
    )
    parser.add_argument("checkpoint", help="a checkpoint .pth written by sparkme-pretrain")
    parser.add_argument(
        "images", nargs="+", help="image files (any format Pillow reads); volume files (.npy, .npz, NIfTI) for 3D"
    )
    parser.add_argument("--out", default="reconstruction.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--mask-ratio", type=float, default=None, help="fraction of patches hidden (default: model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask (default: %(default)s)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"resize+crop side (cube for volumes), a multiple of the patch side (default 224, {VOLUME_SIZE} in 3D)",
    )
    parser.add_argument("--coronal", action="store_true", help="3D: show the middle coronal slice beside the axial")
    return parser


@user_errors("sparkme-visualize", also=(RuntimeError,))  # damaged checkpoints raise RuntimeError
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist (give a .pth of sparkme-pretrain)")
    from sparkme.data.volume_folder import volume_format

    volumes = all(volume_format(path) is not None for path in args.images)
    if volumes:
        images = load_volumes(args.images, args.image_size or VOLUME_SIZE)
    else:
        images = load_images(args.images, args.image_size or 224)
    from sparkme.training.checkpoint import load_spark

    model = load_spark(args.checkpoint, map_location="cpu").eval()
    if (getattr(model, "spatial_dims", 2) == 3) != volumes:
        wanted = "volume files (.npy, .npz, NIfTI)" if not volumes else "image files"
        raise ValueError(f"{args.checkpoint} holds a {'3D' if not volumes else '2D'} model: give it {wanted}")
    if args.mask_ratio is not None:
        from sparkme.method.masking import check_mask_ratio

        model.mask_ratio = check_mask_ratio(args.mask_ratio)
    result = model.reconstruct(images, generator=torch.Generator().manual_seed(args.seed))
    out = save_reconstruction_grid(result, args.out, titles=[Path(p).name for p in args.images], coronal=args.coronal)
    what = "volumes" if volumes else "images"
    print(f"wrote {out} ({len(args.images)} {what}, mask ratio {model.mask_ratio}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
