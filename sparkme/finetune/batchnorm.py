"""BatchNorm re-calibration: re-estimate a frozen trunk's running statistics on full images.

SparK pretrains on sparse inputs: BatchNorm's running statistics are gathered over the
*visible* sites of masked images (40% of them at mask ratio 0.6), and at full images the
deeper stages see activations with a different, larger spread (measured 2-4x the recorded
variance in ResNet-18 ``layer3``/``layer4``). A linear probe on a frozen trunk normalises with
those stale statistics. The standard fix when a BN network moves to a new input distribution
is to reset the statistics and re-estimate them with forward passes in train mode (no
gradient, cumulative average), here over the probe's own training images.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["recalibrate_batchnorm"]


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    ]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, batch_size: int) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on ``dataset``.

    Runs ``model.forward_features`` (timm) or ``model`` over all of ``dataset`` once with only
    the BatchNorm layers in train mode (dropout / drop-path stay off) and ``momentum=None``, so
    each running mean / variance becomes the plain average of the per-batch statistics. The
    model is left in eval mode with the original momenta. Returns how many BatchNorm layers
    were re-estimated (0 for a LayerNorm network such as ConvNeXt: nothing to do).
    """
    norms = _batchnorms(model)
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    forward = getattr(model, "forward_features", model)
    model.eval()
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            forward(images)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.eval()
    return len(norms)
