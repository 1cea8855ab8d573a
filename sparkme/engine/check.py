"""Refuse, at ``sparsify`` time, every module that cannot keep exact sparse semantics.

Only leaf modules that are known to have a sparse twin are accepted; containers are accepted
because their own forward code runs on :class:`SparseMap`, which refuses unknown operations at
run time. Every problem is reported at once, each with its module path, type and reason.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .errors import UnsupportedLayerError
from .geometry import conv_geometry_problem, pool_geometry_problem

__all__ = ["check_modules", "module_problem"]

_ELEMENTWISE_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.LogSigmoid,
    nn.Dropout,
    nn.AlphaDropout,
)
_CONVS = (nn.Conv2d, nn.Conv3d)
_MAX_POOLS = (nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS = (nn.AvgPool2d, nn.AvgPool3d)
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)
_KNOWN_LEAVES: tuple[type[nn.Module], ...] = (
    *_CONVS,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Linear,
    *_MAX_POOLS,
    *_AVG_POOLS,
    *_GLOBAL_POOLS,
)
# timm leaves whose forward is per site, per sample or already handled by the sparse ops
_TIMM_LEAF_NAMES = {"DropPath", "GlobalResponseNorm", "LayerNorm", "LayerNorm2d", "BatchNormAct2d", "GroupNorm1"}
_REFUSED = {
    "interpolation reads hidden sites and creates new ones": (
        nn.Upsample,
        nn.UpsamplingNearest2d,
        nn.UpsamplingBilinear2d,
    ),
    "a transposed convolution creates sites that were not active": (
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    ),
    "explicit padding shifts the dense grid against the sparse sites": (
        nn.ZeroPad2d,
        nn.ConstantPad2d,
        nn.ReflectionPad2d,
        nn.ReplicationPad2d,
        nn.ZeroPad3d,
        nn.ConstantPad3d,
        nn.ReflectionPad3d,
        nn.ReplicationPad3d,
    ),
    "attention mixes every position, hidden ones included": (nn.MultiheadAttention,),
    "it rearranges space and channels, which has no sparse twin": (
        nn.PixelShuffle,
        nn.PixelUnshuffle,
        nn.Fold,
        nn.Unfold,
        nn.Flatten,
    ),
}


def module_problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot run sparsely, or None."""
    for reason, types in _REFUSED.items():
        if isinstance(module, types):
            return reason
    cls = type(module).__name__
    if type(module).__module__.startswith("timm.") and ("Attention" in cls or cls.endswith("Attn")):
        return "attention mixes every position, hidden ones included"
    if isinstance(module, _CONVS):
        if cls.endswith("Same"):
            return "it pads dynamically and asymmetrically ('same' padding), shifting the grid against the sparse sites"
        if module.padding_mode != "zeros":
            return (
                f"padding_mode={module.padding_mode!r} reads values beyond the border; only zero padding is supported"
            )
        return conv_geometry_problem(module.kernel_size, module.stride, module.padding, module.dilation)
    dims = 3 if cls.endswith("3d") else 2
    if isinstance(module, _MAX_POOLS):
        return pool_geometry_problem(
            f"max_pool{dims}d", module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode,
            dims=dims,
        )[0]  # fmt: skip
    if isinstance(module, _AVG_POOLS):
        return pool_geometry_problem(
            f"avg_pool{dims}d", module.kernel_size, module.stride, module.padding, 1, module.ceil_mode,
            module.divisor_override, dims,
        )[0]  # fmt: skip
    if isinstance(module, _GLOBAL_POOLS) and module.output_size not in (1, (1,) * dims):
        return (
            f"adaptive pooling to {module.output_size} mixes hidden and visible sites; only output size 1 is supported"
        )
    is_leaf = next(iter(module.children()), None) is None
    if not is_leaf:
        return None
    if isinstance(module, _ELEMENTWISE_LEAVES + _KNOWN_LEAVES):
        return None
    if cls in _TIMM_LEAF_NAMES or type(module).__module__.startswith("timm.layers.activations"):
        return None
    return (
        "it is not a layer the sparse engine knows; supported leaves are Conv2d/3d, BatchNorm, InstanceNorm, "
        "GroupNorm, LayerNorm, Linear, Max/AvgPool2d/3d, global pooling, activations, dropout, DropPath and GRN"
    )


def check_modules(named_modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Raise one :class:`UnsupportedLayerError` listing every module without an exact sparse twin."""
    problems = []
    for name, module in named_modules:
        problem = module_problem(module)
        if problem is not None:
            problems.append(f"  {name or '<root>'} ({type(module).__name__}): {problem}")
    if problems:
        raise UnsupportedLayerError(
            "cannot sparsify this model; these modules have no exact sparse twin:\n"
            + "\n".join(problems)
            + "\nReplace them, or pass stages= that end before them."
        )
