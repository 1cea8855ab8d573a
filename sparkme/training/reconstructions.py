"""The per-epoch reconstruction picture: input, masked input and reconstruction rows, as PNG bytes.

Images are shown in colour; volumes as grayscale slices through their middle (axial, optionally
coronal too), each volume scaled by its input's range so the three rows compare directly.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparkme.data.transforms import denormalize, eval_transform
from sparkme.method.masking import upsample_mask

__all__ = ["HIDDEN_GREY", "ROW_KEYS", "reconstruction_png", "slice_views"]

ROW_KEYS = ("input", "masked", "reconstruction")
HIDDEN_GREY = 0.5  # hidden cubes in the masked row of a slice view


def _middle_slices(volumes: torch.Tensor, coronal: bool) -> list[torch.Tensor]:
    """``[B, C, D, H, W]`` -> the middle axial slice ``[B, C, H, W]`` (and the middle coronal ``[B, C, D, W]``)."""
    views = [volumes[:, :, volumes.shape[2] // 2]]
    if coronal:
        views.append(volumes[:, :, :, volumes.shape[3] // 2])
    return views


def _interleave(views: list[torch.Tensor]) -> torch.Tensor:
    """Views ``[B, 1, h_i, w_i]`` -> ``[B * len(views), 1, h, w]`` (each volume's views side by side),
    smaller views padded on the bottom and right with black."""
    height, width = max(v.shape[-2] for v in views), max(v.shape[-1] for v in views)
    padded = [F.pad(v, (0, width - v.shape[-1], 0, height - v.shape[-2])) for v in views]
    return torch.stack(padded, dim=1).flatten(0, 1)


def slice_views(result: dict[str, torch.Tensor], coronal: bool = False) -> dict[str, torch.Tensor]:
    """Grayscale slices of :meth:`sparkme.SparK.reconstruct`'s volumes ``[B, C, D, H, W]``, ready to plot.

    Returns ``input``, ``masked`` and ``reconstruction`` as ``[B * V, 1, h, w]`` in ``[0, 1]`` (``V`` =
    1 view, or 2 with ``coronal``: each volume's axial then coronal slice), first channel only, every
    row scaled by that volume's input minimum and maximum; hidden cubes of ``masked`` are mid-grey.
    """
    volumes = result["input"].detach().float().cpu()
    low = volumes[:, :1].flatten(1).amin(1).view(-1, 1, 1, 1, 1)
    span = (volumes[:, :1].flatten(1).amax(1).view(-1, 1, 1, 1, 1) - low).clamp_min(1e-12)
    rows = {key: ((result[key].detach().float().cpu()[:, :1] - low) / span).clamp(0, 1) for key in ROW_KEYS}
    if "mask" in result:
        mask = result["mask"].cpu()
        hidden = upsample_mask(mask, volumes.shape[2] // mask.shape[1], spatial_dims=3).unsqueeze(1)
        rows["masked"] = rows["masked"].masked_fill(hidden, HIDDEN_GREY)
    return {key: _interleave(_middle_slices(rows[key], coronal)) for key in ROW_KEYS}


def reconstruction_png(
    model: nn.Module,
    dataset: Any,
    image_size: int,
    count: int,
    seed: int,
    transform: Callable[[Any], torch.Tensor] | None = None,
    coronal: bool = True,
) -> bytes:
    """Fixed images (the first ``count``) and fixed masks (``seed``): the same weights give the same bytes.

    ``transform`` turns a dataset item into the model's input; by default the centre crop of
    ``image_size`` for images (``eval_transform``) and a centre ``image_size`` cube for volumes (a
    model whose ``spatial_dims`` is 3), shown as middle axial and coronal (``coronal``) slices.
    """
    from torchvision.utils import save_image

    volumes = getattr(model, "spatial_dims", 2) == 3
    if transform is None:
        transform = _volume_eval_transform(image_size) if volumes else eval_transform(image_size)
    device = next(model.parameters()).device
    count = min(count, len(dataset))
    images = torch.stack([transform(dataset[i][0]) for i in range(count)]).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.reconstruct(images, generator=generator)
    finally:
        model.train(was_training)
    if volumes:
        views = slice_views(out, coronal)
        rows = [views[key] for key in ROW_KEYS]
        count = rows[0].shape[0] // images.shape[0] * count
    else:
        rows = [denormalize(out[key].float()) for key in ROW_KEYS]
    buffer = io.BytesIO()
    save_image(torch.cat(rows).cpu(), buffer, format="png", nrow=count, padding=2)
    return buffer.getvalue()


def _volume_eval_transform(size: int) -> Callable[[Any], torch.Tensor]:
    from sparkme.data.volume_transforms import volume_eval_transform

    return volume_eval_transform(size)
