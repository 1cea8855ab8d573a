"""3-D engine test helpers: an INDEPENDENT masked-dense reference for volumes, masks and a 3-D user CNN.

Like ``engine_reference`` for images, it shares no code with ``sparkme.engine``: the ordinary dense
model runs with the mask re-applied after every module (forward hooks); BatchNorm, InstanceNorm
and GroupNorm take their statistics over visible voxels only, max pooling sees hidden voxels as
-inf and squeeze-excitation averages over visible voxels.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from engine_reference import ChannelsLastMLP, TinySE
from torch import nn

SPACE = (2, 3, 4)


def random_visible3d(batch: int, grid: tuple[int, int, int], ratio: float, seed: int = 0) -> torch.Tensor:
    """bool [B, 1, d, h, w]: exactly round(L * ratio) hidden cubes per volume."""
    generator = torch.Generator().manual_seed(seed)
    total = grid[0] * grid[1] * grid[2]
    hidden = round(total * ratio)
    visible = torch.ones(batch, total, dtype=torch.bool)
    for b in range(batch):
        visible[b, torch.randperm(total, generator=generator)[:hidden]] = False
    return visible.view(batch, 1, *grid)


def border_visible3d(batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Volume 0 hides its first slab along every axis; volume 1 its last slab along every axis."""
    visible = torch.ones(batch, 1, *grid, dtype=torch.bool)
    visible[0, 0, 0], visible[0, 0, :, 0], visible[0, 0, :, :, 0] = False, False, False
    last = 1 % batch
    visible[last, 0, -1], visible[last, 0, :, -1], visible[last, 0, :, :, -1] = False, False, False
    return visible


def to_voxels(visible: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """bool [B, 1, D, H, W] from a cube-level mask."""
    patch = size[0] // visible.shape[-3]
    for axis in SPACE:
        visible = visible.repeat_interleave(patch, axis)
    return visible


class _MaskBank:
    """The voxel mask at every resolution the model produces (a cell is visible if any voxel is)."""

    def __init__(self, voxels: torch.Tensor):
        self.voxels = voxels.float()
        self.size = tuple(voxels.shape[-3:])

    def at(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        steps = {full // side if side and full % side == 0 else 0 for full, side in zip(self.size, shape)}
        if len(steps) != 1 or 0 in steps:
            return None
        step = steps.pop()
        return F.max_pool3d(self.voxels, step, step) > 0 if step > 1 else self.voxels > 0

    def for_output(self, out: torch.Tensor) -> torch.Tensor | None:
        """A mask broadcastable to ``out`` when it is a spatial map of this volume (either layout)."""
        if not isinstance(out, torch.Tensor) or out.dim() != 5:
            return None
        if out.shape[2] > 1 and self.at(out.shape[2:]) is not None:
            return self.at(out.shape[2:])
        if out.shape[1] > 1 and self.at(out.shape[1:4]) is not None:
            return self.at(out.shape[1:4]).permute(0, 2, 3, 4, 1)
        return None


def _channel(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None, None]


def _masked_bn_forward(self, x):
    mask = self._bank.at(x.shape[2:]).to(x.dtype)
    if self.training:
        count = mask.sum()
        mean = (x * mask).sum((0, *SPACE)) / count
        var = (((x - _channel(mean)) * mask) ** 2).sum((0, *SPACE)) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * count / (count - 1))
    else:
        mean, var = self.running_mean, self.running_var
    out = (x - _channel(mean)) / torch.sqrt(_channel(var) + self.eps)
    return out * _channel(self.weight) + _channel(self.bias)


def _masked_in_forward(self, x):
    """InstanceNorm3d: per volume and channel over visible voxels; running stats like torch's."""
    mask = self._bank.at(x.shape[2:]).to(x.dtype)
    if self.training or not self.track_running_stats:
        count = mask.sum(SPACE, keepdim=True)
        mean = (x * mask).sum(SPACE, keepdim=True) / count
        var = (((x - mean) * mask) ** 2).sum(SPACE, keepdim=True) / count
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * count / (count - 1)
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.flatten(1).mean(0))
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.flatten(1).mean(0))
    else:
        mean, var = _channel(self.running_mean), _channel(self.running_var)
    out = (x - mean) / torch.sqrt(var + self.eps)
    return out * _channel(self.weight) + _channel(self.bias) if self.affine else out


def _masked_gn_forward(self, x):
    mask = self._bank.at(x.shape[2:]).to(x.dtype)
    B, C = x.shape[:2]
    g = x.view(B, self.num_groups, C // self.num_groups, *x.shape[2:])
    m = mask.view(B, 1, 1, *x.shape[2:])
    dims = (2, 3, 4, 5)
    count = m.sum(dims, keepdim=True) * (C // self.num_groups)
    mean = (g * m).sum(dims, keepdim=True) / count
    var = (((g - mean) * m) ** 2).sum(dims, keepdim=True) / count
    out = ((g - mean) / torch.sqrt(var + self.eps)).view_as(x)
    return out * _channel(self.weight) + _channel(self.bias)


def _masked_maxpool_forward(self, x):
    mask = self._bank.at(x.shape[2:])
    x = torch.where(mask, x, torch.full_like(x, float("-inf")))
    return F.max_pool3d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


def _masked_se_forward(self, x):
    mask = self._bank.at(x.shape[2:]).to(x.dtype)
    s = (x * mask).sum(SPACE, keepdim=True) / mask.sum(SPACE, keepdim=True).clamp(min=1)
    return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


_FORWARDS = (
    (nn.modules.batchnorm._BatchNorm, _masked_bn_forward),
    (nn.modules.instancenorm._InstanceNorm, _masked_in_forward),
    (nn.GroupNorm, _masked_gn_forward),
    (nn.MaxPool3d, _masked_maxpool_forward),
)


def masked_reference3d(model: nn.Module, voxels: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` computing SparK's masked-dense semantics for the voxel mask ``voxels``."""
    ref = copy.deepcopy(model)
    bank = _MaskBank(voxels)
    for module in ref.modules():
        module._bank = bank
        for kind, forward in _FORWARDS:
            if isinstance(module, kind):
                module.forward = types.MethodType(forward, module)
        if isinstance(module, TinySE):
            module.forward = types.MethodType(_masked_se_forward, module)

        def remask(_module, _inputs, out):
            mask = bank.for_output(out)
            return out if mask is None else torch.where(mask, out, torch.zeros_like(out))

        module.register_forward_hook(remask)
    return ref


class Residual3d(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.relu(self.body(x) + x)


class UserCNN3d(nn.Module):
    """Strides 2 / 4 / 8 / 16 on volumes: odd, non-cubic, strided, even (tiling), dilated, grouped,
    depthwise and strided depthwise Conv3d; BatchNorm3d, InstanceNorm3d (with and without running stats), GroupNorm,
    channels-last LayerNorm, SE, residual adds, Max/AvgPool3d, global pooling in the head."""

    def __init__(self, in_chans: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_chans, 8, 3, 1, 1, bias=False), nn.BatchNorm3d(8), nn.ReLU())
        self.stage1 = nn.Sequential(
            nn.Conv3d(8, 16, 3, 2, 1),
            nn.InstanceNorm3d(16, affine=True),
            nn.LeakyReLU(0.01),
            TinySE(16, dims=3),
            nn.Conv3d(16, 16, (3, 5, 1), 1, (1, 2, 0)),
        )
        self.stage2 = nn.Sequential(
            nn.Conv3d(16, 16, 3, 2, 1, groups=16),
            nn.Conv3d(16, 16, 3, 1, 2, dilation=2, groups=4),
            nn.GroupNorm(4, 16),
            nn.Conv3d(16, 16, 5, 1, 2, groups=16),
            ChannelsLastMLP(16),
        )
        self.stage3 = nn.Sequential(
            nn.Conv3d(16, 24, 2, 2),
            nn.InstanceNorm3d(24, affine=True, track_running_stats=True),
            nn.ReLU6(),
            nn.MaxPool3d(3, 1, 1),
            Residual3d(nn.Sequential(nn.Conv3d(24, 24, 3, 1, 1, bias=False), nn.BatchNorm3d(24))),
        )
        self.stage4 = nn.Sequential(nn.AvgPool3d(2), nn.Conv3d(24, 32, 1), nn.BatchNorm3d(32))
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 4))

    def forward(self, x):
        return self.head(self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x))))))


STAGES3D = ["stage1", "stage2", "stage3", "stage4"]
SIZE3D = (32, 48, 32)  # patch 16: a 2 x 3 x 2 grid of cubes


def make_model3d() -> nn.Module:
    """The 3-D user CNN with deterministic, non-trivial weights and running statistics."""
    torch.manual_seed(0)
    model = UserCNN3d()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model
