"""sparkme-visualize: plot input / masked / reconstruction rows for a pretrained SparK checkpoint.

sparkme-visualize runs/demo/last.pth photo1.jpg photo2.png --out grid.png --mask-ratio 0.6 --seed 0
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from sparkme.cli.errors import user_errors
from sparkme.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sparkme.method.masking import upsample_mask

__all__ = ["load_images", "main", "save_reconstruction_grid"]

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
) -> Path:
    """Write one PNG with rows input / masked / reconstruction and one column per image.

    ``result`` is :meth:`sparkme.SparK.reconstruct`'s output (normalized with ``mean``/``std``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, _to_pixels(result[key], mean, std)) for key, label in ROWS]
    if "mask" in result:  # paint hidden patches of the masked row mid-grey (0 would be the mean colour)
        masked = rows[1][1]
        grid_h = result["mask"].shape[-2]
        hidden = upsample_mask(result["mask"].cpu(), masked.shape[1] // grid_h)  # patches are square
        rows[1] = (rows[1][0], masked.masked_fill(hidden.unsqueeze(-1), 0.5))
    count = rows[0][1].shape[0]
    figure, axes = plt.subplots(len(rows), count, figsize=(cell_inches * count, cell_inches * len(rows)), squeeze=False)
    for row, (label, pixels) in enumerate(rows):
        for column in range(count):
            axis = axes[row][column]
            axis.imshow(pixels[column].numpy(), interpolation="nearest")
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparkme-visualize", description="Plot SparK reconstructions (input / masked / reconstruction) as a PNG."
    )
    parser.add_argument("checkpoint", help="a checkpoint .pth written by sparkme-pretrain")
    parser.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    parser.add_argument("--out", default="reconstruction.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--mask-ratio", type=float, default=None, help="fraction of patches hidden (default: model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask (default: %(default)s)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="resize+crop side, a multiple of the patch side (default: %(default)s)",
    )
    return parser


@user_errors("sparkme-visualize", also=(RuntimeError,))  # damaged checkpoints raise RuntimeError
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist (give a .pth of sparkme-pretrain)")
    images = load_images(args.images, args.image_size)
    from sparkme.training.checkpoint import load_spark

    model = load_spark(args.checkpoint, map_location="cpu").eval()
    if args.mask_ratio is not None:
        from sparkme.method.masking import check_mask_ratio

        model.mask_ratio = check_mask_ratio(args.mask_ratio)
    result = model.reconstruct(images, generator=torch.Generator().manual_seed(args.seed))
    out = save_reconstruction_grid(result, args.out, titles=[Path(p).name for p in args.images])
    print(f"wrote {out} ({len(args.images)} images, mask ratio {model.mask_ratio}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
