"""Built-in demo images: procedurally drawn, deterministic, natural-image-like.

Every image is a smooth two-colour gradient with soft low-frequency shading, a few
small distractor shapes, and one *dominant* pattern whose kind is the label
(circles, squares, triangles, stripes, checkers, rings). Nothing is downloaded or
stored: image ``i`` is a pure function of ``(seed, i, image_size)``, so runs and
tests are reproducible and a pretraining run has real structure to learn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["DemoDataset"]

CLASSES = ["circles", "squares", "triangles", "stripes", "checkers", "rings"]
_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges like a photo


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Linear gradient between two colours plus a soft low-frequency shading field."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (np.cos(angle) * xs + np.sin(angle) * ys + 1.0) / 2.0
    c0, c1 = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    image = c0 + (c1 - c0) * t[..., None]
    fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * math.pi)
    shading = 1.0 + 0.15 * np.sin(2 * math.pi * (fx * xs + fy * ys) + phase)
    return image * shading[..., None]


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A full-image periodic pattern (stripes or checkers) in [0, 1]."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(size / 10, size / 4)
    u = np.cos(angle) * xs + np.sin(angle) * ys
    if kind == "stripes":
        return (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    v = -np.sin(angle) * xs + np.cos(angle) * ys
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, rng: np.random.Generator, size: int, scale: float) -> None:
    """One filled shape of ``kind`` at a random place, radius ``scale`` x image size."""
    radius = scale * size * rng.uniform(0.7, 1.3)
    cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, size=2)
    fill = _colour(rng)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if kind == "circles":
        draw.ellipse(box, fill=fill)
    elif kind == "rings":
        draw.ellipse(box, outline=fill, width=max(2, int(radius * 0.35)))
    elif kind == "squares":
        rot = rng.uniform(0, math.pi / 2)
        corners = [
            (cx + radius * math.cos(rot + k * math.pi / 2), cy + radius * math.sin(rot + k * math.pi / 2))
            for k in range(4)
        ]
        draw.polygon(corners, fill=fill)
    else:  # triangles
        rot = rng.uniform(0, 2 * math.pi)
        corners = [
            (cx + radius * math.cos(rot + k * 2 * math.pi / 3), cy + radius * math.sin(rot + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        draw.polygon(corners, fill=fill)


def render_demo_image(seed: int, index: int, image_size: int) -> tuple[Image.Image, int]:
    """Draw demo image ``index`` of the set seeded by ``seed``; returns (RGB image, label)."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))
    kind = CLASSES[label]
    big = image_size * _SUPERSAMPLE
    pixels = _background(rng, big)
    if kind in ("stripes", "checkers"):
        pattern = _texture(kind, rng, big)[..., None]
        pixels = pixels * (1 - 0.6 * pattern) + np.array(_colour(rng), np.float32) * 0.6 * pattern
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    shape_kinds = ["circles", "squares", "triangles", "rings"]
    for _ in range(int(rng.integers(1, 4))):  # small distractors of any shape kind
        _draw_shape(draw, shape_kinds[int(rng.integers(len(shape_kinds)))], rng, big, scale=0.06)
    if kind in shape_kinds:  # the dominant pattern: one to three large shapes of the label's kind
        for _ in range(int(rng.integers(1, 4))):
            _draw_shape(draw, kind, rng, big, scale=0.2)
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=0.6 * _SUPERSAMPLE))
    canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    noise = rng.normal(0.0, 4.0, size=(image_size, image_size, 3))
    out = np.clip(np.asarray(canvas, np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB"), label


class DemoDataset:
    """``length`` procedurally generated images (deterministic from ``seed`` and the index).

    ``__getitem__(i) -> (image, label)``: a PIL RGB image (or ``transform(image)``) and
    the kind of its dominant pattern, an int in ``[0, num_classes)``.
    """

    classes: list[str] = list(CLASSES)
    num_classes: int = len(CLASSES)

    def __init__(
        self,
        length: int = 512,
        image_size: int = 96,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if length < 1:
            raise ValueError(f"DemoDataset length must be >= 1, got {length}")
        if image_size < 8:
            raise ValueError(f"DemoDataset image_size must be >= 8 pixels, got {image_size}")
        self.length, self.image_size, self.seed, self.transform = length, image_size, seed, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for DemoDataset of length {self.length}")
        image, label = render_demo_image(self.seed, index % self.length, self.image_size)
        return (self.transform(image) if self.transform is not None else image), label

    def __repr__(self) -> str:
        return f"DemoDataset(length={self.length}, image_size={self.image_size}, seed={self.seed})"
