"""The per-epoch reconstruction picture: input, masked input and reconstruction rows, as PNG bytes."""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from sparkme.data.transforms import denormalize, eval_transform

__all__ = ["reconstruction_png"]


def reconstruction_png(model: nn.Module, dataset: Any, image_size: int, count: int, seed: int) -> bytes:
    """Fixed images (the first ``count``) and fixed masks (``seed``): the same weights give the same bytes."""
    from torchvision.utils import save_image

    device = next(model.parameters()).device
    count = min(count, len(dataset))
    transform = eval_transform(image_size)
    images = torch.stack([transform(dataset[i][0]) for i in range(count)]).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.reconstruct(images, generator=generator)
    finally:
        model.train(was_training)
    rows = [denormalize(out[key].float()) for key in ("input", "masked", "reconstruction")]
    buffer = io.BytesIO()
    save_image(torch.cat(rows).cpu(), buffer, format="png", nrow=count, padding=2)
    return buffer.getvalue()
