"""detectron2 export: key set and shapes of detectron2's ResNet, written out independently here.

detectron2 is not installable on this machine, so the expected names follow its documented
ResNet layout: ``stem.conv1`` (+ ``.norm``), stages ``res2..res5`` of blocks ``B`` with
``conv1..conv3`` (+ ``.norm``) and, on each stage's first block, ``shortcut`` (+ ``.norm``).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from sparkme.converters import convert, save_export
from sparkme.converters.detectron2_format import d2_resnet_key

NORM = ("weight", "bias", "running_mean", "running_var")


def expected_d2_resnet(depth_blocks: tuple[int, ...], bottleneck: bool) -> dict[str, tuple[int, ...]]:
    """Key -> shape of detectron2's ResNet (torchvision-style strides) for the given blocks per stage."""
    shapes: dict[str, tuple[int, ...]] = {"stem.conv1.weight": (64, 3, 7, 7)}
    shapes.update({f"stem.conv1.norm.{name}": (64,) for name in NORM})
    in_channels = 64
    for stage, blocks in enumerate(depth_blocks):
        width = 64 * 2**stage
        out_channels = width * 4 if bottleneck else width
        for block in range(blocks):
            prefix = f"res{stage + 2}.{block}"
            if bottleneck:
                convs = {
                    "conv1": (width, in_channels, 1, 1),
                    "conv2": (width, width, 3, 3),
                    "conv3": (out_channels, width, 1, 1),
                }
            else:
                convs = {"conv1": (width, in_channels, 3, 3), "conv2": (width, width, 3, 3)}
            if block == 0 and (stage > 0 or in_channels != out_channels):
                convs["shortcut"] = (out_channels, in_channels, 1, 1)
            for conv, shape in convs.items():
                shapes[f"{prefix}.{conv}.weight"] = shape
                shapes.update({f"{prefix}.{conv}.norm.{name}": (shape[0],) for name in NORM})
            in_channels = out_channels
    return shapes


def test_resnet50_key_set_shapes_and_values(resnet50, tmp_path):
    export = convert(resnet50.state_dict(), "resnet50", "detectron2")
    path = save_export(export, tmp_path / "r50.pkl")
    with open(path, "rb") as handle:
        data = pickle.load(handle, encoding="latin1")  # how detectron2 reads .pkl files
    assert data["__author__"] == "sparkme" and data["matching_heuristics"] is True
    model = data["model"]

    expected = expected_d2_resnet((3, 4, 6, 3), bottleneck=True)
    assert set(model) == set(expected)
    for key, shape in expected.items():
        assert isinstance(model[key], np.ndarray) and model[key].dtype == np.float32, key
        assert model[key].shape == shape, key

    source = resnet50.state_dict()
    np.testing.assert_array_equal(model["stem.conv1.norm.running_var"], source["bn1.running_var"].numpy())
    np.testing.assert_array_equal(model["res4.0.shortcut.norm.bias"], source["layer3.0.downsample.1.bias"].numpy())
    np.testing.assert_array_equal(model["res5.2.conv3.weight"], source["layer4.2.conv3.weight"].numpy())
    assert all(key.endswith("num_batches_tracked") or key.startswith("fc.") for key in export.dropped)
    assert "fc.weight" in export.dropped and "bn1.num_batches_tracked" in export.dropped


def test_resnet50_notes_carry_the_required_config(resnet50):
    notes = "\n".join(convert(resnet50.state_dict(), "resnet50", "detectron2").notes)
    assert "MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]" in notes
    assert "MODEL.PIXEL_STD: [58.395, 57.12, 57.375]" in notes
    assert 'INPUT.FORMAT: "RGB"' in notes
    assert "MODEL.RESNETS.STRIDE_IN_1X1: False" in notes
    assert "MODEL.RESNETS.DEPTH: 50" in notes


def test_resnet18_basic_blocks(resnet18):
    export = convert(resnet18.state_dict(), "resnet18", "detectron2")
    expected = expected_d2_resnet((2, 2, 2, 2), bottleneck=False)
    assert {key: value.shape for key, value in export.state_dict.items()} == expected
    assert "MODEL.RESNETS.RES2_OUT_CHANNELS: 64" in export.notes


@pytest.mark.parametrize(
    ("torchvision_key", "d2_key"),
    [
        ("conv1.weight", "stem.conv1.weight"),
        ("bn1.running_mean", "stem.conv1.norm.running_mean"),
        ("layer1.0.bn3.weight", "res2.0.conv3.norm.weight"),
        ("layer4.0.downsample.0.weight", "res5.0.shortcut.weight"),
        ("layer2.3.downsample.1.running_var", "res3.3.shortcut.norm.running_var"),
    ],
)
def test_key_rule(torchvision_key, d2_key):
    assert d2_resnet_key(torchvision_key) == d2_key
