"""Any folder of volumes (``.npy``, ``.npz``, and NIfTI when ``nibabel`` is installed), read recursively.

Arrays are ``[D, H, W]`` or channels-first ``[C, D, H, W]`` (NIfTI: ``[X, Y, Z]`` or
``[X, Y, Z, C]``, channels moved first; axes are kept as stored, not reoriented). Every file's
header is read when the dataset is built, so an unreadable or corrupt header, a wrong number
of dimensions, a non-numeric type or a mix of channel counts is an error before any training;
voxel values (NaN/inf) and truncated compressed data are checked when a volume is read (or at
build time with ``verify=True``). A bad file is a :class:`~sparkme.errors.UserError` naming it;
with ``skip_bad=True`` it is skipped with a warning and listed in ``skipped`` instead (like
the image folder). Symbolic links are followed once per real file, as for images.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparkme.data.folder import walk_files
from sparkme.data.volume_transforms import CLIP_PERCENTILES, normalize_intensity
from sparkme.errors import UserError

__all__ = ["VolumeFolderDataset", "VOLUME_SUFFIXES", "read_volume", "read_volume_shape", "volume_format"]

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".npy", ".npz", ".nii", ".nii.gz")
NPZ_KEYS = ("image", "volume", "data")  # looked up, in order, when an .npz holds several arrays
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    EOFError,
    KeyError,
    zipfile.BadZipFile,
    zlib.error,
)


def volume_format(path: str | os.PathLike[str]) -> str | None:
    """``"npy"``, ``"npz"`` or ``"nifti"`` from the file name; None for any other file."""
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    return {".npy": "npy", ".npz": "npz"}.get(Path(name).suffix)


def _nibabel(path: Path) -> Any:
    try:
        import nibabel
    except ImportError:
        raise UserError(
            f"{str(path)!r} is a NIfTI volume and reading NIfTI needs nibabel: pip install nibabel "
            "(or convert the volumes to .npy)"
        ) from None
    return nibabel


def _npy_header(stream: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read(stream)
    return tuple(shape), dtype


def _npz_key(names: list[str], path: Path, key: str | None) -> str:
    """The array of an ``.npz`` holding the volume: ``key``, the only array, or the first of ``NPZ_KEYS``."""
    if key is None and len(names) == 1:
        key = names[0]
    if key is None:
        key = next((k for k in NPZ_KEYS if k in names), None)
    if key is None or key not in names:
        wanted = f"key {key!r}" if key is not None else f"one array or a key among {list(NPZ_KEYS)}"
        raise UserError(f"{str(path)!r} holds arrays {names}, not {wanted}; set data.dataset.npz_key")
    return key


def _stored_shape(path: Path, fmt: str, npz_key: str | None) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and type as stored, from the header only (a truncated ``.npy`` is found here too)."""
    if fmt == "npy":
        with open(path, "rb") as stream:
            shape, dtype = _npy_header(stream)
            expected = stream.tell() + int(np.prod(shape)) * dtype.itemsize
        if os.path.getsize(path) < expected:
            raise ValueError(f"file is truncated ({os.path.getsize(path)} of {expected} bytes)")
        return shape, dtype
    if fmt == "npz":
        with zipfile.ZipFile(path) as archive:
            names = [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]
            with archive.open(f"{_npz_key(names, path, npz_key)}.npy") as stream:
                return _npy_header(stream)
    image = _nibabel(path).load(path)
    return tuple(int(side) for side in image.shape), np.dtype(image.get_data_dtype())


def _channels_first(shape: tuple[int, ...], fmt: str) -> tuple[int, ...]:
    if len(shape) == 3:
        return (1, *shape)
    if len(shape) == 4:
        return (shape[3], *shape[:3]) if fmt == "nifti" else shape
    raise ValueError(f"array of shape {shape} has {len(shape)} dimensions; a volume is [D, H, W] or [C, D, H, W]")


def _failure(path: Path, error: BaseException) -> UserError:
    if isinstance(error, UserError):
        return error
    return UserError(f"cannot read volume {str(path)!r} ({type(error).__name__}: {error}); fix or remove the file")


def read_volume_shape(path: str | os.PathLike[str], npz_key: str | None = None) -> tuple[int, int, int, int]:
    """``(C, D, H, W)`` of a volume file from its header; a :class:`UserError` naming the file when bad."""
    path = Path(path)
    fmt = volume_format(path)
    if fmt is None:
        raise UserError(f"{str(path)!r} is not a volume file (expected one of {', '.join(VOLUME_SUFFIXES)})")
    try:
        stored, dtype = _stored_shape(path, fmt, npz_key)
        if dtype.kind not in "biuf" or dtype.hasobject:
            raise ValueError(f"values of type {dtype} are not real numbers")
        shape = _channels_first(stored, fmt)
        if min(shape) < 1:
            raise ValueError(f"array of shape {stored} is empty")
    except UserError:
        raise
    except (*_READ_ERRORS, *_nifti_errors()) as error:
        raise _failure(path, error) from error
    return shape  # type: ignore[return-value]


def _nifti_errors() -> tuple[type[BaseException], ...]:
    try:
        from nibabel.filebasedimages import ImageFileError
    except ImportError:
        return ()
    return (ImageFileError,)


def _load_array(path: Path, fmt: str, npz_key: str | None) -> np.ndarray:
    if fmt == "npy":
        return np.load(path, allow_pickle=False)
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as archive:
            return archive[_npz_key(list(archive.files), path, npz_key)]
    array = np.asanyarray(_nibabel(path).load(path).dataobj)
    return np.moveaxis(array, 3, 0) if array.ndim == 4 else array


def read_volume(path: str | os.PathLike[str], npz_key: str | None = None) -> np.ndarray:
    """Read a volume file as ``[C, D, H, W]`` (its stored type); a :class:`UserError` naming the file when
    it cannot be read, has the wrong shape or holds NaN/inf voxels."""
    path = Path(path)
    shape = read_volume_shape(path, npz_key)
    try:
        array = _load_array(path, volume_format(path) or "", npz_key)
    except (*_READ_ERRORS, *_nifti_errors()) as error:
        raise _failure(path, error) from error
    array = array.reshape(shape) if array.ndim == 3 else array
    if array.shape != shape:
        raise UserError(f"volume {str(path)!r} read as shape {array.shape}, its header says {shape}")
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise UserError(
                f"volume {str(path)!r} has {bad} NaN or infinite voxels; fix or remove the file "
                "(or set data.dataset.skip_bad=true)"
            )
    return array


class VolumeFolderDataset:
    """Every volume file below ``root`` (recursive, sorted), as ``(volume, 0)`` pairs.

    ``volume`` is a float32 tensor ``[C, D, H, W]`` normalised per channel (percentile clip,
    then z-score; :func:`~sparkme.data.volume_transforms.normalize_intensity`), at the file's
    own size, or ``transform(volume)`` (e.g. a random crop).
    """

    num_classes: int = 1
    classes: list[str] = ["volume"]

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[torch.Tensor], Any] | None = None,
        clip_percentiles: Sequence[float] | None = CLIP_PERCENTILES,
        npz_key: str | None = None,
        skip_bad: bool = False,
        verify: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"volume folder {str(self.root)!r} does not exist or is not a directory")
        if clip_percentiles is not None and not 0 <= clip_percentiles[0] < clip_percentiles[1] <= 100:
            raise ValueError(
                f"clip_percentiles must be (low, high) with 0 <= low < high <= 100, got {clip_percentiles}"
            )
        self.transform, self.npz_key, self.skip_bad = transform, npz_key, bool(skip_bad)
        self.clip_percentiles = None if clip_percentiles is None else tuple(float(p) for p in clip_percentiles)
        self.skipped: list[tuple[str, str]] = []
        self._bad: set[int] = set()
        self.files, self.shapes = self._scan()
        self.channels = self._common_channels()
        if verify:
            for index in range(len(self.files)):
                self._read(index)
            if len(self._bad) == len(self.files):
                raise UserError(f"none of the {len(self.files)} volumes under {str(self.root)!r} can be read")

    def _scan(self) -> tuple[list[Path], list[tuple[int, int, int, int]]]:
        files, shapes, others = [], [], 0
        for path in walk_files(self.root):
            if volume_format(path) is None:
                others += 1
                continue
            try:
                shapes.append(read_volume_shape(path, self.npz_key))
            except UserError as error:
                if not self.skip_bad:
                    raise
                self._skip(path, str(error))
                continue
            files.append(path)
        if not files:
            raise UserError(
                f"no readable volume found under {str(self.root)!r} ({len(self.skipped)} bad volume files, "
                f"{others} other files); point data.root at a folder holding {'/'.join(VOLUME_SUFFIXES)} volumes "
                "(subfolders are searched)"
            )
        return files, shapes

    def _common_channels(self) -> int:
        by_count: dict[int, list[Path]] = {}
        for path, shape in zip(self.files, self.shapes):
            by_count.setdefault(shape[0], []).append(path)
        if len(by_count) > 1:
            found = "; ".join(f"{c} channels: {len(p)} files, e.g. {str(p[0])!r}" for c, p in sorted(by_count.items()))
            raise UserError(f"volumes under {str(self.root)!r} differ in channel count ({found}); give one kind")
        return next(iter(by_count))

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append((str(path), reason))
        log.warning("skipping %s: %s", path, reason)

    def _read(self, index: int) -> np.ndarray | None:
        """The normalised volume, or None when it is bad and ``skip_bad`` (then skipped from now on)."""
        try:
            return normalize_intensity(read_volume(self.files[index], self.npz_key), self.clip_percentiles)
        except UserError as error:
            if not self.skip_bad:
                raise
            self._bad.add(index)
            self._skip(self.files[index], str(error))
            return None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -len(self.files) <= index < len(self.files):
            raise IndexError(f"index {index} out of range for VolumeFolderDataset of {len(self.files)} volumes")
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            volume = None if i in self._bad else self._read(i)
            if volume is not None:
                tensor = torch.from_numpy(volume)
                return (self.transform(tensor) if self.transform is not None else tensor), 0
        raise UserError(f"none of the {len(self.files)} volumes under {str(self.root)!r} can be read")

    def __repr__(self) -> str:
        return (
            f"VolumeFolderDataset(root={str(self.root)!r}, volumes={len(self.files)}, channels={self.channels}, "
            f"skipped={len(self.skipped)})"
        )
