"""Engine test helpers: an INDEPENDENT masked-dense reference, masks, a small user CNN.

Imported by the tests as ``engine_reference`` (conftest.py puts this folder on sys.path).

The reference runs the ordinary dense model and re-applies the mask after every module (forward
hooks), with BatchNorm / GroupNorm statistics over visible sites only, max pooling that sees
hidden sites as -inf, and squeeze-excitation that averages over visible sites. It shares no code
with ``sparkme.engine``.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------- masks
def random_visible(batch: int, grid: tuple[int, int], ratio: float, seed: int = 0) -> torch.Tensor:
    """bool [B, 1, h, w]: exactly round(L * ratio) hidden patches per sample."""
    generator = torch.Generator().manual_seed(seed)
    h, w = grid
    total = h * w
    hidden = round(total * ratio)
    visible = torch.ones(batch, total, dtype=torch.bool)
    for b in range(batch):
        visible[b, torch.randperm(total, generator=generator)[:hidden]] = False
    return visible.view(batch, 1, h, w)


def border_visible(batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Sample 0 hides its whole top row and left column of patches; sample 1 its bottom row and right column."""
    visible = torch.ones(batch, 1, *grid, dtype=torch.bool)
    visible[0, 0, 0, :] = False
    visible[0, 0, :, 0] = False
    visible[1 % batch, 0, -1, :] = False
    visible[1 % batch, 0, :, -1] = False
    return visible


def to_pixels(visible: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """bool [B, 1, H, W] from a patch-level mask."""
    patch = size[0] // visible.shape[-2]
    return visible.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


# ---------------------------------------------------------------- reference
class _MaskBank:
    """The pixel mask at every resolution the model produces (a cell is visible if any pixel is)."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels.float()
        self.size = tuple(pixels.shape[-2:])

    def at(self, height: int, width: int) -> torch.Tensor | None:
        H, W = self.size
        if height == 0 or width == 0 or H % height or W % width or H // height != W // width:
            return None
        step = H // height
        return F.max_pool2d(self.pixels, step, step) > 0 if step > 1 else self.pixels > 0

    def for_output(self, out: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
        """(mask broadcastable to out, channels_last) when out is a spatial map of this image."""
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            return None
        if out.shape[2] > 1 and self.at(out.shape[2], out.shape[3]) is not None:
            return self.at(out.shape[2], out.shape[3]), False
        if out.shape[1] > 1 and self.at(out.shape[1], out.shape[2]) is not None:
            return self.at(out.shape[1], out.shape[2]).permute(0, 2, 3, 1), True
        return None


def _masked_bn_forward(self, x):
    mask = self._bank.at(x.shape[2], x.shape[3]).to(x.dtype)
    if self.training:
        count = mask.sum()
        mean = (x * mask).sum((0, 2, 3)) / count
        var = (((x - mean[None, :, None, None]) * mask) ** 2).sum((0, 2, 3)) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * count / (count - 1))
    else:
        mean, var = self.running_mean, self.running_var
    out = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
    out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
    if hasattr(self, "act"):  # timm BatchNormAct2d
        out = self.act(self.drop(out))
    return out


def _masked_gn_forward(self, x):
    mask = self._bank.at(x.shape[2], x.shape[3]).to(x.dtype)
    B, C, H, W = x.shape
    g = x.view(B, self.num_groups, C // self.num_groups, H, W)
    m = mask.view(B, 1, 1, H, W)
    count = m.sum((2, 3, 4), keepdim=True) * (C // self.num_groups)
    mean = (g * m).sum((2, 3, 4), keepdim=True) / count
    var = (((g - mean) * m) ** 2).sum((2, 3, 4), keepdim=True) / count
    out = ((g - mean) / torch.sqrt(var + self.eps)).view(B, C, H, W)
    return out * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def _masked_maxpool_forward(self, x):
    mask = self._bank.at(x.shape[2], x.shape[3])
    x = torch.where(mask, x, torch.full_like(x, float("-inf")))
    return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


def _visible_mean(bank: _MaskBank, x: torch.Tensor) -> torch.Tensor:
    mask = bank.at(x.shape[2], x.shape[3]).to(x.dtype)
    return (x * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp(min=1)


def _masked_se_forward(self, x):
    """timm SEModule / the test CNN's SE: squeeze over visible sites only."""
    s = _visible_mean(self._bank, x)
    if hasattr(self, "fc1"):  # timm SEModule
        s = self.fc2(self.act(self.bn(self.fc1(s))))
        return x * self.gate(s)
    if hasattr(self, "conv_reduce"):  # timm EfficientNet / MobileNetV3 SqueezeExcite
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(s))))
    return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


def masked_reference(model: nn.Module, pixels: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` that computes SparK's masked-dense semantics for the pixel mask ``pixels``."""
    ref = copy.deepcopy(model)
    bank = _MaskBank(pixels)
    for module in ref.modules():
        module._bank = bank
        name = type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = types.MethodType(_masked_bn_forward, module)
        elif isinstance(module, nn.GroupNorm):
            module.forward = types.MethodType(_masked_gn_forward, module)
        elif isinstance(module, nn.MaxPool2d):
            module.forward = types.MethodType(_masked_maxpool_forward, module)
        elif name in ("SEModule", "SqueezeExcite", "TinySE"):
            module.forward = types.MethodType(_masked_se_forward, module)

        def remask(_module, _inputs, out):
            found = bank.for_output(out)
            if found is None:
                return out
            mask, _ = found
            return torch.where(mask, out, torch.zeros_like(out))

        module.register_forward_hook(remask)
    return ref


class _Stop(Exception):
    pass


def reference_features(ref: nn.Module, stage_names: list[str], images: torch.Tensor, pixels: torch.Tensor):
    """Stage outputs of the masked-dense reference (input pixels masked too); stops after the last stage
    so that modules past it (e.g. EfficientNet's conv_head/bn2) do not update their statistics."""
    outputs: dict[str, torch.Tensor] = {}

    def record(name, out):
        outputs[name] = out
        if len(outputs) == len(stage_names):
            raise _Stop

    handles = [
        ref.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: record(name, o))
        for name in stage_names
    ]
    forward = getattr(ref, "forward_features", ref)
    try:
        forward(images * pixels.to(images.dtype))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[name] for name in stage_names]


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "", floor: float = 1e-30) -> float:
    """max |a - e| <= tol * max(max |e|, floor); returns the measured relative error.

    ``floor`` is the scale for tensors that are zero in exact arithmetic (e.g. the gradient of a
    conv bias followed by train-mode BatchNorm), where only rounding noise is left.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(floor)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
    return err


# ---------------------------------------------------------------- a user CNN
class TinySE(nn.Module):
    """Squeeze-excitation of images (``dims=2``) or volumes (``dims=3``)."""

    def __init__(self, channels: int, dims: int = 2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.reduce = conv(channels, channels // 4, 1)
        self.expand = conv(channels // 4, channels, 1)

    def forward(self, x):
        s = x.mean(tuple(range(2, x.dim())), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style: permute, LayerNorm, Linear, GELU, Linear, permute, layer-scale, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, 2 * channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x):  # images or volumes: channels-last over every spatial dim
        shortcut, rank = x, x.dim()
        x = x.permute(0, *range(2, rank), 1)
        x = self.fc2(self.act(self.fc1(self.norm(x))))
        x = x * self.gamma
        return x.permute(0, rank - 1, *range(1, rank - 1)) + shortcut


class UserCNN(nn.Module):
    """Strides 2 / 4 / 8; odd, even, non-square, dilated, grouped and depthwise convs; BN, GN, SE, LN, pools."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.stage1 = nn.Sequential(
            nn.Conv2d(16, 24, 3, 2, 1), nn.GroupNorm(4, 24), nn.SiLU(), TinySE(24), nn.Conv2d(24, 24, (3, 5), 1, (1, 2))
        )
        self.stage2 = nn.Sequential(
            nn.MaxPool2d(2, 2),
            nn.Conv2d(24, 32, 3, 1, 2, dilation=2, groups=4),
            nn.BatchNorm2d(32),
            nn.Hardswish(),
            nn.Conv2d(32, 32, 5, 1, 2, groups=32),
            ChannelsLastMLP(32),
        )
        self.stage3 = nn.Sequential(
            nn.Conv2d(32, 48, 2, 2), nn.ReLU6(), nn.MaxPool2d(3, 1, 1), nn.Conv2d(48, 48, 1), nn.BatchNorm2d(48)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))

    def forward(self, x):
        return self.head(self.stage3(self.stage2(self.stage1(self.stem(x)))))


USER_STAGES = ["stage1", "stage2", "stage3"]


@dataclass
class Case:
    """A model, the engine's stage list and input geometry."""

    model: nn.Module
    stages: list[str] | None
    size: tuple[int, int]


def make_model(name: str, drop_path_rate: float = 0.0) -> nn.Module:
    """A test model with deterministic weights: "user_cnn", "user_cnn_syncbn" or a timm name."""
    import timm

    if name.startswith("user_cnn"):
        torch.manual_seed(0)
        model = UserCNN()
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if name.endswith("syncbn") else model
    kwargs = {"drop_path_rate": drop_path_rate}
    if name.endswith("+conv_mlp"):  # ConvNeXt with 1x1-conv MLPs: LayerNorm2d and channels-first GRN
        name, kwargs["conv_mlp"] = name.removesuffix("+conv_mlp"), True
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    _randomize_norms(model)
    return model


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial BN running stats, affine params and layer-scales, so eval mode and GRN are really tested."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if type(module).__name__ == "GlobalResponseNorm":
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            gamma = getattr(module, "gamma", None)
            if isinstance(gamma, nn.Parameter):
                gamma.copy_(torch.rand(gamma.shape, generator=generator) * 0.5 + 0.25)
