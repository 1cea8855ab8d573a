"""Any folder of images, read recursively (labels ignored), robust to bad files.

Files that are not images, or that fail to decode (truncated, corrupt), are skipped
with a warning and collected in ``skipped`` so a run can report them at the end; a
folder without a single readable image is a clear error when the dataset is built,
before any training. Symbolic links are followed, each real file and folder once (a
link loop cannot multiply the samples). Every image comes out as 8-bit RGB in its EXIF
orientation, whatever its mode (grayscale, 16-bit, RGBA, palette, CMYK):
:func:`read_image` is that one loader for every command line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sparkme.errors import UserError

__all__ = ["ImageFolderDataset", "load_rgb", "read_image", "to_rgb", "walk_files"]

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


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """:func:`load_rgb` for one named file, with a one-line error that names it."""
    try:
        return load_rgb(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"image {str(path)!r} does not exist") from error
    except _READ_ERRORS as error:
        raise UserError(
            f"cannot read image {str(path)!r} ({type(error).__name__}: {error}); give a file Pillow decodes "
            "(PNG, JPEG, ...)"
        ) from error


def walk_files(root: Path) -> Iterator[Path]:
    """Every non-hidden file below ``root`` in sorted order, following symbolic links.

    Each real folder is entered once and each real file yielded once, so a link loop or a
    second link to the same folder adds nothing.
    """
    seen_folders: set[str] = set()
    seen_files: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real_folder = os.path.realpath(dirpath)
        if real_folder in seen_folders:
            dirnames[:] = []
            continue
        seen_folders.add(real_folder)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            real_file = os.path.realpath(path)
            if name.startswith(".") or real_file in seen_files:
                continue
            seen_files.add(real_file)
            yield path


def _is_image_header(path: Path) -> bool:
    """Cheap check at scan time: does Pillow recognise the file as an image at all?"""
    try:
        with Image.open(path) as image:
            return image.size[0] > 0 and image.size[1] > 0
    except _READ_ERRORS:
        return False


class ImageFolderDataset:
    """Every readable image below ``root`` (recursive, sorted), as ``(image, 0)`` pairs.

    Files Pillow cannot identify are skipped at scan time, and the scan decodes images until
    one succeeds (so a folder of only truncated or corrupt files fails here). Other files
    that fail to decode (e.g. truncated JPEGs) are skipped when first read and replaced by
    the next readable image. ``skipped`` lists ``(path, reason)`` for both kinds.
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
        for path in walk_files(self.root):
            if _is_image_header(path):
                self.files.append(path)
            else:
                self._skip(path, "not an image Pillow can read")
        if not self.files:
            raise UserError(
                f"no readable image found under {str(self.root)!r} ({len(self.skipped)} other files skipped); "
                "point data.root at a folder holding .jpg/.png/... images (subfolders are searched)"
            )
        self._bad: set[int] = set()
        self._find_one_decodable()

    def _find_one_decodable(self) -> None:
        """Decode files in order until one works; none working is an error before any training."""
        first_error, not_images = "", len(self.skipped)
        for i, path in enumerate(self.files):
            try:
                load_rgb(path)
            except _READ_ERRORS as error:
                self._mark_bad(i, error)
                first_error = first_error or f"{path.name}: {type(error).__name__}: {error}"
                continue
            return
        raise UserError(
            f"none of the {len(self.files)} image files under {str(self.root)!r} can be decoded (truncated or "
            f"corrupt; first: {first_error}; {not_images} other files are not images); point data.root at a "
            "folder with readable images"
        )

    def _mark_bad(self, index: int, error: BaseException) -> None:
        self._bad.add(index)
        self._skip(self.files[index], f"failed to decode ({type(error).__name__}: {error})")

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
                self._mark_bad(i, error)
                continue
            return (self.transform(image) if self.transform is not None else image), 0
        raise RuntimeError(f"none of the {len(self.files)} images under {str(self.root)!r} could be decoded")

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={str(self.root)!r}, images={len(self.files)}, skipped={len(self.skipped)})"
