"""SparK's speed switches change no number beyond round-off (float64): densify from the sparse maps,
the dense part in channels-last layout. Loss, prediction, every gradient and BatchNorm statistics."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from _compare import assert_same_step

import sparkme


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = sparkme.sparsify(timm.create_model(name, pretrained=False), backend="gather")
    model = sparkme.SparK(encoder, mask_ratio=0.5, decoder_width=64).double().train()
    with torch.no_grad():  # non-trivial densify norms, so their gradients matter
        for norm in model.densify.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.1)
    return model


def _step(model: torch.nn.Module, from_maps: bool, channels_last: bool) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    model.densify_from_maps, model.channels_last = from_maps, channels_last
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 12, generator=generator).argsort(dim=1).lt(6).view(2, 3, 4)
    loss, pred, _ = model(images, mask=mask)
    loss.backward()
    grads = {f"grad {k}": p.grad for k, p in model.named_parameters() if p.grad is not None}
    buffers = {f"buffer {k}": b for k, b in model.named_buffers() if b.is_floating_point()}
    return {"loss": loss.detach(), "pred": pred.detach(), "images grad": images.grad, **grads, **buffers}


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
@pytest.mark.parametrize(("from_maps", "channels_last"), [(True, False), (False, True), (True, True)])
def test_switches_keep_every_gradient(name: str, from_maps: bool, channels_last: bool) -> None:
    model = _model(name)
    reference = _step(model, from_maps=False, channels_last=False)
    result = _step(model, from_maps=from_maps, channels_last=channels_last)
    assert_same_step(reference, result)


def test_maps_whose_sites_are_not_the_visible_patches_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("resnet18")
    original = model.encoder.forward_maps

    def one_more_hidden(images: torch.Tensor, visible: torch.Tensor):
        fewer = visible.clone()
        fewer[0, 0, fewer[0, 0].nonzero()[0, 0], fewer[0, 0].nonzero()[0, 1]] = False
        return original(images, fewer)

    monkeypatch.setattr(model.encoder, "forward_maps", one_more_hidden)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = torch.tensor([[[True, False], [False, True]], [[False, True], [True, False]]])
    with pytest.raises(RuntimeError, match="active sites must be the visible patches"):
        model(images, mask=mask)
