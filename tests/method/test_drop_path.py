"""ResNet drop path (the recipes' 0.05-0.15) keeps sparse semantics: one draw per sample, as the dense net."""

from __future__ import annotations

import copy

import timm
import torch
from torch import nn

import sparkme


def _masked_dense_features(model: nn.Module, images: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
    """Official SparK's emulation in eval-mode BN: mask the input and every conv / BN / pool output."""

    def remask(module, args, output):
        size = output.shape[-1]
        ratio = size // visible.shape[-1]
        return output * visible.repeat_interleave(ratio, -2).repeat_interleave(ratio, -1)

    handles = [
        m.register_forward_hook(remask)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.MaxPool2d)
    ]
    features: list[torch.Tensor] = []
    handles += [
        getattr(model, f"layer{i}").register_forward_hook(lambda m, a, out: features.append(out)) for i in range(1, 5)
    ]
    pixels = visible.repeat_interleave(images.shape[-1] // visible.shape[-1], -2).repeat_interleave(
        images.shape[-1] // visible.shape[-1], -1
    )
    model(images * pixels)
    for handle in handles:
        handle.remove()
    return features


def test_resnet_drop_path_draws_once_per_sample_like_the_dense_network():
    torch.manual_seed(0)
    dense = timm.create_model("resnet18", drop_path_rate=0.5).double().eval()
    with torch.no_grad():
        for module in dense.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)  # timm zero-inits each block's last BN: no branch to drop
    reference = copy.deepcopy(dense)
    encoder = sparkme.sparsify(dense)
    for model in (encoder, reference):
        model.eval()
        for module in model.modules():
            if type(module).__name__ == "DropPath":
                module.train()  # drop path active, BatchNorm on running statistics: samples stay independent
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 96, generator=generator, dtype=torch.float64)
    visible = torch.rand(4, 1, 2, 3, generator=generator) < 0.5
    visible[:, :, 0, 0] = True
    torch.manual_seed(7)
    sparse = encoder(images, visible)
    torch.manual_seed(7)
    expected = _masked_dense_features(reference, images, visible)
    for i, (a, b) in enumerate(zip(sparse, expected, strict=True)):
        error = ((a - b).abs().max() / b.abs().max()).item()
        assert error < 1e-10, f"stage {i}: relative error {error:.2e}"
    for module in encoder.modules():
        module.eval()
    assert any(not torch.allclose(a, b) for a, b in zip(sparse, encoder(images, visible)))  # something was dropped
