"""The 3D residual encoder: shapes, the feature_info contract, conv geometry, init, gradients, configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparkme.models import BasicBlock3d, ResNet3d

SMALL = {"widths": (4, 6, 8, 10, 12), "depths": (1, 2, 1, 1, 1)}


def _stage_outputs(model: ResNet3d, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(info["module"]).register_forward_hook(
            lambda _m, _i, out, name=info["module"]: outputs.__setitem__(name, out)
        )
        for info in model.feature_info
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.mark.parametrize("downsample", ["conv3", "conv2"])
def test_feature_info_names_the_stages_with_their_channels_and_reductions(downsample: str) -> None:
    model = ResNet3d(in_chans=2, downsample=downsample, **SMALL).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    outputs = _stage_outputs(model, x)
    assert [info["module"] for info in model.feature_info] == [f"stages.{i}" for i in range(5)]
    for info in model.feature_info:
        out = outputs[info["module"]]
        assert out.shape[1] == info["num_chs"]
        assert out.shape[2:] == (32 // info["reduction"],) * 3
    assert [info["reduction"] for info in model.feature_info] == [1, 2, 4, 8, 16]
    assert torch.equal(model.forward_features(x), outputs["stages.4"])


def test_the_engine_reads_the_stages_from_feature_info() -> None:
    from sparkme.engine.hierarchy import find_stages

    stages, _ = find_stages(ResNet3d(**SMALL))
    assert [(s.name, s.channels, s.stride) for s in stages] == [
        ("stages.2", 8, 4),
        ("stages.3", 10, 8),
        ("stages.4", 12, 16),
    ]


def test_heads_and_shapes() -> None:
    x = torch.randn(2, 1, 32, 48, 16)
    model = ResNet3d(**SMALL).eval()
    assert model.forward_features(x).shape == (2, 12, 2, 3, 1)
    assert isinstance(model.get_classifier(), nn.Identity) and model(x).shape == (2, 12)
    classifier = ResNet3d(num_classes=5, **SMALL).eval()
    logits = classifier(x)
    pooled = classifier.forward_features(x).mean(dim=(2, 3, 4))
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, classifier.fc(pooled))
    torch.testing.assert_close(classifier.forward_head(classifier.forward_features(x), pre_logits=True), pooled)
    classifier.reset_classifier(3)
    assert classifier(x).shape == (2, 3) and classifier.num_classes == 3


@pytest.mark.parametrize("downsample", ["conv3", "conv2"])
def test_every_conv_is_one_the_sparse_engine_takes(downsample: str) -> None:
    """Odd kernels centred (padding k//2); an even kernel equals its stride with no padding."""
    model = ResNet3d(downsample=downsample, **SMALL)
    strided = []
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv3d):
            continue
        kernel, stride, padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        assert len({*conv.kernel_size}) == len({*conv.stride}) == len({*conv.padding}) == 1, name
        if kernel % 2:
            assert padding == kernel // 2, name
        else:
            assert kernel == stride and padding == 0, name
        if stride > 1:
            strided.append((name, kernel))
    main_path = {name: kernel for name, kernel in strided if name.endswith("conv1")}
    assert set(main_path) == {f"stages.{i}.0.conv1" for i in range(1, 5)}
    assert set(main_path.values()) == {3 if downsample == "conv3" else 2}


def test_block_is_conv_norm_act_conv_norm_plus_shortcut_in_float64() -> None:
    torch.manual_seed(0)
    block = BasicBlock3d(3, 5, stride=2, norm="instance", act="leaky_relu").double().eval()
    for norm in (block.bn1, block.bn2, block.shortcut[1]):
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 8, 8, 8, dtype=torch.float64)

    def norm(y: torch.Tensor, layer: nn.InstanceNorm3d) -> torch.Tensor:
        return F.instance_norm(y, weight=layer.weight, bias=layer.bias, eps=layer.eps)

    hidden = F.leaky_relu(norm(F.conv3d(x, block.conv1.weight, stride=2, padding=1), block.bn1), 0.01)
    main = norm(F.conv3d(hidden, block.conv2.weight, padding=1), block.bn2)
    shortcut = norm(F.conv3d(x, block.shortcut[0].weight, stride=2), block.shortcut[1])
    torch.testing.assert_close(block(x), F.leaky_relu(main + shortcut, 0.01), rtol=0, atol=1e-12)
    identity = BasicBlock3d(5, 5).double().eval()
    nn.init.zeros_(identity.bn2.weight)
    nn.init.zeros_(identity.bn2.bias)
    y = torch.randn(1, 5, 4, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(identity(y), F.relu(y), rtol=0, atol=0)


def test_norm_act_options_and_refusals() -> None:
    model = ResNet3d(norm="instance", act="leaky_relu", **SMALL)
    norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(m.affine for m in norms)
    assert not any(isinstance(m, nn.BatchNorm3d | nn.ReLU) for m in model.modules())
    assert any(isinstance(m, nn.LeakyReLU) for m in model.modules())
    with pytest.raises(ValueError, match="norm must be one of"):
        ResNet3d(norm="group")
    with pytest.raises(ValueError, match="act must be one of"):
        ResNet3d(act="gelu")
    with pytest.raises(ValueError, match="downsample must be one of"):
        ResNet3d(downsample="pool")
    with pytest.raises(ValueError, match="equally long"):
        ResNet3d(widths=(8, 16), depths=(1,))


def test_init_kaiming_convs_and_unit_norms() -> None:
    torch.manual_seed(0)
    model = ResNet3d()
    conv = model.stages[4][0].conv1  # 256 -> 320, 3x3x3: fan_out 8640 (fan_in 6912 would be 12% wider)
    assert abs(conv.weight.std().item() / math.sqrt(2 / (320 * 27)) - 1) < 0.02
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))


def test_dense_forward_backward_on_one_volume() -> None:
    torch.manual_seed(0)
    model = ResNet3d(num_classes=2)
    x = torch.randn(1, 1, 32, 32, 32, requires_grad=True)
    loss = model(x).square().sum()
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradients_match_a_central_difference_in_float64() -> None:
    """Autograd's directional derivative (input and weights, train-mode BatchNorm) against a float64
    central difference, whose own error is O(h^2) ~ 1e-10 here."""
    torch.manual_seed(0)
    model = ResNet3d(widths=(2, 3, 4), depths=(1, 1, 1), num_classes=1, act="leaky_relu").double()
    x = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    weight = model.stages[1][0].conv1.weight
    direction_x, direction_w = torch.randn_like(x), torch.randn_like(weight)
    model(x).sum().backward()
    analytic = (x.grad * direction_x).sum() + (weight.grad * direction_w).sum()
    step = 1e-5

    def shifted(sign: float) -> torch.Tensor:
        with torch.no_grad():
            weight.add_(sign * step * direction_w)
            value = model(x + sign * step * direction_x).sum()
            weight.sub_(sign * step * direction_w)
        return value

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * step)
    assert abs(analytic.item()) > 1e-3
    assert abs(numeric.item() - analytic.item()) <= 1e-7 * max(1.0, abs(analytic.item()))


def test_model_configs_build_the_encoder() -> None:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module(config_module="sparkme.conf", version_base="1.3"):
        small = instantiate(compose(config_name="pretrain", overrides=["model=resnet3d_small"]).model)
        full = compose(config_name="pretrain", overrides=["model=resnet3d"]).model
    assert isinstance(small, ResNet3d) and small.in_chans == 1
    assert [(i["num_chs"], i["reduction"]) for i in small.feature_info] == [
        (16, 1),
        (32, 2),
        (64, 4),
        (128, 8),
    ]
    assert len(small.stages[1]) == 1
    assert list(full.widths) == [32, 64, 128, 256, 320] and list(full.depths) == [1, 2, 2, 2, 2]
