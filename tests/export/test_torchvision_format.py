"""torchvision export: loads into torchvision's ResNet with only ``fc`` missing, same trunk outputs."""

from __future__ import annotations

import pytest
import torch
import torchvision

from sparkme.converters import UnsupportedArchitectureError, convert, save_export


def torchvision_trunk(model: torchvision.models.ResNet, images: torch.Tensor) -> list[torch.Tensor]:
    """Stage outputs (strides 4, 8, 16, 32) of a torchvision ResNet."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    outputs = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        outputs.append(x)
    return outputs


def timm_trunk(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.act1(model.bn1(model.conv1(images))))
    outputs = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_loads_with_only_fc_missing_and_matches_timm(name, request, images, tmp_path):
    source = request.getfixturevalue(name)
    export = convert(source.state_dict(), name, "torchvision")
    path = save_export(export, tmp_path / "tv.pth")

    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    result = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    with torch.no_grad():
        for ours, theirs in zip(torchvision_trunk(model, images), timm_trunk(source, images), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_resnext_keys_match_torchvision():
    import timm

    source = timm.create_model("resnext50_32x4d", pretrained=False)
    export = convert(source.state_dict(), "resnext50_32x4d", "torchvision")
    target = torchvision.models.resnext50_32x4d(weights=None)
    result = target.load_state_dict(export.state_dict, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []


def test_non_resnet_is_a_clear_error(convnext_atto):
    with pytest.raises(UnsupportedArchitectureError, match="no torchvision/detectron2/mmdet ResNet counterpart"):
        convert(convnext_atto.state_dict(), "convnext_atto", "torchvision")
    with pytest.raises(UnsupportedArchitectureError):
        convert({}, "resnet50d", "detectron2")  # deep-stem variant: different stem keys
