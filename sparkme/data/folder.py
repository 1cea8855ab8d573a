"""Any folder of images, read recursively (labels ignored), robust to bad files.

Files that are not images, or that fail to decode (truncated, corrupt), are skipped
with a warning and collected in ``skipped`` so a run can report them at the end; a
folder without a single readable image is a clear error. Every image comes out as
8-bit RGB in its EXIF orientation, whatever its mode (grayscale, 16-bit, RGBA,
palette, CMYK).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageFolderDataset", "load_rgb", "to_rgb"]

log = logging.getLogger(__name__)

_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16/32-bit ints are rescaled, alpha is put on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open, fully decode, apply EXIF orientation and convert to RGB (raises on bad files)."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def _is_image_header(path: Path) -> bool:
    """Cheap check at scan time: does Pillow recognise the file as an image at all?"""
    try:
        with Image.open(path) as image:
            return image.size[0] > 0 and image.size[1] > 0
    except _READ_ERRORS:
        return False


class ImageFolderDataset:
    """Every readable image below ``root`` (recursive, sorted), as ``(image, 0)`` pairs.

    Files Pillow cannot identify are skipped at scan time; files that fail to decode
    later (e.g. truncated JPEGs) are skipped when first read and replaced by the next
    readable image. ``skipped`` lists ``(path, reason)`` for both kinds.
    """

    num_classes: int = 1
    classes: list[str] = ["image"]

    def __init__(self, root: str | os.PathLike[str], transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        self.transform = transform
        self.skipped: list[tuple[str, str]] = []
        self.files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                if _is_image_header(path):
                    self.files.append(path)
                else:
                    self._skip(path, "not an image Pillow can read")
        if not self.files:
            raise ValueError(
                f"no readable image found under {str(self.root)!r} ({len(self.skipped)} other files skipped); "
                "point data.root at a folder holding .jpg/.png/... images (subfolders are searched)"
            )
        self._bad: set[int] = set()

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append((str(path), reason))
        log.warning("skipping %s: %s", path, reason)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            if i in self._bad:
                continue
            try:
                image = load_rgb(self.files[i])
            except _READ_ERRORS as error:
                self._bad.add(i)
                self._skip(self.files[i], f"failed to decode ({type(error).__name__}: {error})")
                continue
            return (self.transform(image) if self.transform is not None else image), 0
        raise RuntimeError(f"none of the {len(self.files)} images under {str(self.root)!r} could be decoded")

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={str(self.root)!r}, images={len(self.files)}, skipped={len(self.skipped)})"
