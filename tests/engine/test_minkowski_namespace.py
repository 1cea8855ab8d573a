"""Using the engine must leave MinkowskiEngine's public names intact for the user's own code.

Importing ``MinkowskiEngine.MinkowskiConvolution`` as a submodule replaces the package attribute
``ME.MinkowskiConvolution`` (the layer class) by that module object.
"""

from __future__ import annotations

import timm
import torch

import sparkme


def test_encoder_leaves_minkowski_layer_classes_callable():
    import MinkowskiEngine as ME

    encoder = sparkme.sparsify(timm.create_model("resnet18", pretrained=False), backend="minkowski")
    visible = torch.tensor([[True, False], [False, True]]).reshape(1, 1, 2, 2)
    encoder(torch.randn(1, 3, 64, 64), visible)
    for name in ("MinkowskiConvolution", "MinkowskiMaxPooling", "MinkowskiConvolutionFunction"):
        assert isinstance(getattr(ME, name), type), f"ME.{name} was replaced by {getattr(ME, name)!r}"
