"""Built-in demo volumes: procedurally drawn, deterministic, scan-like 3D structure.

Every volume is a smooth background (a linear ramp with soft low-frequency shading), a few
small distractor objects, and two to four large *dominant* objects whose kind is the label
(spheres, ellipsoids, tubes, shells), each of its own intensity with soft (about one voxel)
edges, plus mild noise. Volume ``i`` is a pure function of ``(seed, i, volume_size)``: nothing
is downloaded or stored. Objects are drawn inside their bounding boxes only, so a 64^3
volume takes a few milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sparkme.data.volume_transforms import normalize_intensity

__all__ = ["DemoVolumeDataset", "render_demo_volume", "VOLUME_CLASSES"]

VOLUME_CLASSES = ["spheres", "ellipsoids", "tubes", "shells"]
_EDGE = 0.6  # edge softness in voxels (tanh width)
_NOISE = 0.02


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ramp between two levels along a random direction, times a soft sinusoidal shading."""
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    z, y, x = axis[:, None, None], axis[None, :, None], axis[None, None, :]
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-12
    ramp = (direction[0] * z + direction[1] * y + direction[2] * x).astype(np.float32)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    low, high = rng.uniform(0.05, 0.45, size=2).astype(np.float32)
    freq = rng.uniform(0.5, 2.0, size=3)
    phase = rng.uniform(0, 2 * math.pi)
    angle = (2 * math.pi) * (freq[0] * z + freq[1] * y + freq[2] * x) + phase
    return (low + (high - low) * ramp) * (1.0 + 0.15 * np.sin(angle, dtype=np.float32))


def _box(centre: np.ndarray, reach: float, size: int) -> tuple[slice, slice, slice] | None:
    """The voxel box within ``reach`` of ``centre`` (clipped to the volume); None when outside."""
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, size)
    if np.any(hi <= lo):
        return None
    return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])


def _offsets(box: tuple[slice, slice, slice], origin: np.ndarray) -> list[np.ndarray]:
    """Broadcastable voxel-centre offsets from ``origin`` along z, y, x inside ``box``."""
    shapes = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    return [
        (np.arange(s.start, s.stop, dtype=np.float32) - np.float32(o)).reshape(shape)
        for s, o, shape in zip(box, origin, shapes)
    ]


def _signed_distance(kind: str, rng: np.random.Generator, size: int, scale: float):
    """``(box, distance)`` of one random object of ``kind`` with radius ``scale`` x size (None: outside)."""
    radius = scale * size * rng.uniform(0.7, 1.3)
    centre = rng.uniform(0.15 * size, 0.85 * size, size=3)
    if kind == "tubes":  # a capsule: distance to a segment through the centre, minus its radius
        half = rng.normal(size=3)
        half *= rng.uniform(1.5, 3.0) * radius / (np.linalg.norm(half) + 1e-12)
        radius *= 0.3
        box = _box(centre, float(np.abs(half).max()) + radius + 2, size)
        if box is None:
            return None
        dz, dy, dx = _offsets(box, centre)
        along = np.clip((dz * half[0] + dy * half[1] + dx * half[2]) / float(half @ half), -1.0, 1.0)
        dist = np.sqrt((dz - along * half[0]) ** 2 + (dy - along * half[1]) ** 2 + (dx - along * half[2]) ** 2)
        return box, dist - radius
    axes = radius * (rng.uniform(0.45, 1.0, size=3) if kind == "ellipsoids" else np.ones(3))
    box = _box(centre, float(axes.max()) + 2, size)
    if box is None:
        return None
    dz, dy, dx = _offsets(box, centre)
    if kind == "ellipsoids":  # rotated axes; the distance is the scaled level set, exact on the surface
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        local = [(rotation[i, 0] * dz + rotation[i, 1] * dy + rotation[i, 2] * dx) / axes[i] for i in range(3)]
        return box, (np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2) - 1.0) * float(axes.min())
    dist = np.sqrt(dz**2 + dy**2 + dx**2) - radius
    if kind == "shells":
        return box, np.abs(dist + 0.2 * radius) - max(0.2 * radius, 1.0)
    return box, dist


def _paint(volume: np.ndarray, kind: str, rng: np.random.Generator, scale: float) -> None:
    """Blend one soft-edged object of ``kind`` and its own intensity into ``volume`` (in place)."""
    found = _signed_distance(kind, rng, volume.shape[0], scale)
    intensity = np.float32(rng.uniform(0.0, 1.0))
    if found is None:
        return
    box, dist = found
    alpha = 0.5 - 0.5 * np.tanh(dist / np.float32(_EDGE))
    region = volume[box]
    region += alpha.astype(np.float32) * (intensity - region)


def render_demo_volume(seed: int, index: int, volume_size: int) -> tuple[np.ndarray, int]:
    """Draw demo volume ``index`` of the set seeded by ``seed``: (float32 ``[S, S, S]`` in [0, 1], label)."""
    rng = np.random.default_rng([seed, index, 3])
    label = int(rng.integers(len(VOLUME_CLASSES)))
    volume = _background(rng, volume_size)
    for _ in range(int(rng.integers(2, 6))):  # small distractors of any kind
        _paint(volume, VOLUME_CLASSES[int(rng.integers(len(VOLUME_CLASSES)))], rng, scale=0.08)
    for _ in range(int(rng.integers(2, 5))):  # the dominant objects, of the label's kind
        _paint(volume, VOLUME_CLASSES[label], rng, scale=0.2)
    volume += rng.standard_normal(volume.shape, dtype=np.float32) * np.float32(_NOISE)
    return np.clip(volume, 0.0, 1.0, out=volume), label


class DemoVolumeDataset:
    """``length`` procedurally generated volumes (deterministic from ``seed`` and the index).

    ``__getitem__(i) -> (volume, label)``: a float32 tensor ``[1, S, S, S]`` z-scored like
    :class:`~sparkme.data.volume_folder.VolumeFolderDataset`'s volumes (or ``transform(volume)``),
    and the kind of its dominant objects, an int in ``[0, num_classes)``.
    """

    classes: list[str] = list(VOLUME_CLASSES)
    num_classes: int = len(VOLUME_CLASSES)

    def __init__(
        self,
        length: int = 256,
        volume_size: int = 64,
        seed: int = 0,
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        if length < 1:
            raise ValueError(f"DemoVolumeDataset length must be >= 1, got {length}")
        if volume_size < 8:
            raise ValueError(f"DemoVolumeDataset volume_size must be >= 8 voxels, got {volume_size}")
        self.length, self.volume_size, self.seed, self.transform = length, volume_size, seed, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for DemoVolumeDataset of length {self.length}")
        volume, label = render_demo_volume(self.seed, index % self.length, self.volume_size)
        tensor = torch.from_numpy(normalize_intensity(volume[None], clip_percentiles=None))
        return (self.transform(tensor) if self.transform is not None else tensor), label

    def __repr__(self) -> str:
        return f"DemoVolumeDataset(length={self.length}, volume_size={self.volume_size}, seed={self.seed})"
