"""mmdet export: ``{"state_dict": {"backbone." + key}}`` with mmdet ResNet / mmpretrain ConvNeXt names.

mmdet is not installable here: expected names are written out from its documented layouts, and
the prefix handling mimics ``init_cfg=dict(type="Pretrained", prefix="backbone.")``, which keeps
the keys starting with the prefix and strips it.
"""

from __future__ import annotations

import pytest
import torch

from sparkme.converters import UnsupportedArchitectureError, convert, save_export

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
PREFIX = "backbone."


def strip_prefix(state_dict: dict, prefix: str = PREFIX) -> dict:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def expected_mmdet_resnet50() -> dict[str, tuple[int, ...]]:
    shapes = {"conv1.weight": (64, 3, 7, 7), **{f"bn1.{name}": (64,) for name in BN}}
    in_channels = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        width, out_channels = 64 * 2**stage, 256 * 2**stage
        for block in range(blocks):
            prefix = f"layer{stage + 1}.{block}"
            convs = {
                ("conv1", "bn1"): (width, in_channels, 1, 1),
                ("conv2", "bn2"): (width, width, 3, 3),
                ("conv3", "bn3"): (out_channels, width, 1, 1),
            }
            if block == 0:
                convs[("downsample.0", "downsample.1")] = (out_channels, in_channels, 1, 1)
            for (conv, norm), shape in convs.items():
                shapes[f"{prefix}.{conv}.weight"] = shape
                shapes.update({f"{prefix}.{norm}.{name}": (shape[0],) for name in BN})
            in_channels = out_channels
    return {key: (() if key.endswith("num_batches_tracked") else shape) for key, shape in shapes.items()}


def test_resnet50_prefixed_keys_and_shapes(resnet50, tmp_path):
    export = convert(resnet50.state_dict(), "resnet50", "mmdet")
    path = save_export(export, tmp_path / "r50_mmdet.pth")
    checkpoint = torch.load(path, weights_only=True)
    backbone = strip_prefix(checkpoint["state_dict"])
    assert len(backbone) == len(checkpoint["state_dict"])
    expected = expected_mmdet_resnet50()
    assert {key: tuple(value.shape) for key, value in backbone.items()} == expected
    assert torch.equal(backbone["layer3.5.bn2.running_mean"], resnet50.state_dict()["layer3.5.bn2.running_mean"])
    assert set(export.dropped) == {"fc.weight", "fc.bias"}
    notes = "\n".join(export.notes)
    assert "type='ResNet', depth=50" in notes and "prefix='backbone.'" in notes and "style='pytorch'" in notes


def expected_mmpretrain_convnext(depths, channels, version2: bool) -> dict[str, tuple[int, ...]]:
    shapes = {
        "downsample_layers.0.0.weight": (channels[0], 3, 4, 4),
        "downsample_layers.0.0.bias": (channels[0],),
        "downsample_layers.0.1.weight": (channels[0],),
        "downsample_layers.0.1.bias": (channels[0],),
    }
    for stage, (depth, width) in enumerate(zip(depths, channels, strict=True)):
        if stage:
            previous = channels[stage - 1]
            shapes[f"downsample_layers.{stage}.0.weight"] = (previous,)
            shapes[f"downsample_layers.{stage}.0.bias"] = (previous,)
            shapes[f"downsample_layers.{stage}.1.weight"] = (width, previous, 2, 2)
            shapes[f"downsample_layers.{stage}.1.bias"] = (width,)
        for block in range(depth):
            prefix = f"stages.{stage}.{block}"
            shapes[f"{prefix}.depthwise_conv.weight"] = (width, 1, 7, 7)
            shapes[f"{prefix}.depthwise_conv.bias"] = (width,)
            shapes[f"{prefix}.norm.weight"] = (width,)
            shapes[f"{prefix}.norm.bias"] = (width,)
            shapes[f"{prefix}.pointwise_conv1.weight"] = (4 * width, width)
            shapes[f"{prefix}.pointwise_conv1.bias"] = (4 * width,)
            shapes[f"{prefix}.pointwise_conv2.weight"] = (width, 4 * width)
            shapes[f"{prefix}.pointwise_conv2.bias"] = (width,)
            if version2:
                shapes[f"{prefix}.grn.gamma"] = (4 * width,)
                shapes[f"{prefix}.grn.beta"] = (4 * width,)
            else:
                shapes[f"{prefix}.gamma"] = (width,)
    return shapes


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_convnext_mmpretrain_names(name):
    import timm

    source = timm.create_model(name, pretrained=False)
    export = convert(source.state_dict(), name, "mmdet")
    backbone = strip_prefix(export.payload["state_dict"])
    expected = expected_mmpretrain_convnext((2, 2, 6, 2), (40, 80, 160, 320), version2=name.startswith("convnextv2"))
    assert {key: tuple(value.shape) for key, value in backbone.items()} == expected
    fc1 = source.state_dict()["stages.2.blocks.3.mlp.fc1.weight"]
    assert torch.equal(backbone["stages.2.3.pointwise_conv1.weight"], fc1.flatten(1))
    assert "arch='atto'" in "\n".join(export.notes)


def test_unsupported_architectures():
    with pytest.raises(UnsupportedArchitectureError, match="wide-bottleneck"):
        convert({}, "wide_resnet50_2", "mmdet")
    with pytest.raises(UnsupportedArchitectureError, match="no mmdet mapping for 'efficientnet_b0'"):
        convert({}, "efficientnet_b0", "mmdet")
