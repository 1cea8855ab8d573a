"""Elementwise ops on sparse maps: activations, arithmetic, residual adds, in-place variants.

An elementwise op acts on the features of the active sites. Dense operands may vary per sample
and per channel (layer-scale ``gamma``, an SE gate ``[B, C, 1, 1]``, drop-path's ``[B, 1, 1, 1]``,
a GRN scale), never over space: hidden sites have no value. In-place ops compute out of place and
rebind the target's features, which every view of the target shares.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from ..context import key_id
from ..errors import UnsupportedLayerError
from ..sparse_map import HANDLERS, SparseMap, func_name, signature_of

__all__ = ["broadcast_rows", "elementwise", "inplace"]


def broadcast_rows(ref: SparseMap, value: torch.Tensor, op: str) -> torch.Tensor:
    """A dense operand that broadcasts against the map, as rows that broadcast against ``[N, C]``."""
    if value.dim() == 0:
        return value
    if value.dim() > ref.ndim:
        raise UnsupportedLayerError(
            f"{op}: a {value.dim()}-d operand cannot broadcast onto a sparse map{ref.ctx.where()}"
        )
    full = value.reshape((1,) * (ref.ndim - value.dim()) + tuple(value.shape))
    if any(full.shape[d] != 1 for d in ref.spatial_dims):
        raise UnsupportedLayerError(
            f"{op}: a dense operand of shape {tuple(value.shape)} varies over space against a sparse map of "
            f"logical shape {tuple(ref.shape)}{ref.ctx.where()}; only per-sample / per-channel operands are supported"
        )
    rows = full.reshape(full.shape[0], full.shape[ref.channel_dim])
    if rows.shape[0] == 1:
        return rows
    if rows.shape[0] != ref.ctx.batch_size:
        raise UnsupportedLayerError(f"{op}: operand batch {rows.shape[0]} != {ref.ctx.batch_size}{ref.ctx.where()}")
    return rows.index_select(0, ref.ctx.batch_index(ref.key))


def _check_same_sites(maps: list[SparseMap], op: str) -> SparseMap:
    ref = maps[0]
    for other in maps[1:]:
        if other is ref:
            continue
        if key_id(other.key) != key_id(ref.key) or other.ctx is not ref.ctx:
            raise UnsupportedLayerError(
                f"{op} combines sparse maps on different sites (strides {ref.tensor_stride} and "
                f"{other.tensor_stride}){ref.ctx.where()}"
            )
        if other.channels_last != ref.channels_last:
            raise UnsupportedLayerError(f"{op} combines channels-first and channels-last maps{ref.ctx.where()}")
    return ref


def elementwise(func: Callable, *args, **kwargs) -> SparseMap:
    """Apply an elementwise op to the features; dense operands broadcast per sample / channel."""
    maps = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, SparseMap)]
    op = func_name(func)
    ref = _check_same_sites(maps, op)
    if "out" in kwargs:
        raise UnsupportedLayerError(f"{op}(out=...) on a sparse map{ref.ctx.where()}")

    def convert(value):
        if isinstance(value, SparseMap):
            return value.features
        if isinstance(value, torch.Tensor):
            return broadcast_rows(ref, value, op)
        return value

    target = args[0] if args else None
    args, kwargs = tree_map(convert, args), tree_map(convert, kwargs)
    signature = signature_of(func)
    if signature is not None and "inplace" in signature.parameters:
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("inplace"):
            bound.arguments["inplace"] = False
            return _rebind(target, func(*bound.args, **bound.kwargs), op)
    return ref.with_features(func(*args, **kwargs))


def inplace(out_of_place: Callable, *args, **kwargs) -> SparseMap:
    """``x.op_(...)``: compute out of place and rebind the target's features (and its views')."""
    return _rebind(args[0] if args else None, elementwise(out_of_place, *args, **kwargs).features, out_of_place)


def _rebind(target, features: torch.Tensor, op) -> SparseMap:
    if not isinstance(target, SparseMap):
        name = op if isinstance(op, str) else func_name(op)
        raise UnsupportedLayerError(f"in-place {name} writes a sparse map into a dense tensor; this cannot stay sparse")
    if features.shape != target.features.shape:
        raise UnsupportedLayerError(
            f"in-place op would change the features' shape {tuple(target.features.shape)} -> {tuple(features.shape)}"
            f"{target.ctx.where()}"
        )
    target.features = features
    return target


# fmt: off
_TORCH = (
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "addcmul", "addcdiv", "neg",
    "negative", "abs", "sigmoid", "tanh", "relu", "exp", "sqrt", "rsqrt", "pow", "square", "clamp", "clamp_min",
    "clamp_max", "clip", "maximum", "minimum", "where", "erf", "sign", "reciprocal", "lerp", "hardswish",
)
# fmt: on
# fmt: off
_FUNCTIONAL = (
    "relu", "relu6", "hardtanh", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid", "tanh",
    "leaky_relu", "elu", "selu", "celu", "softplus", "dropout", "alpha_dropout", "logsigmoid",
)
# fmt: on
_DUNDERS = ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "neg", "abs", "pow", "rpow")
_INPLACE_DUNDERS = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "truediv", "ipow": "pow"}


def _register() -> None:
    for name in _TORCH + _FUNCTIONAL:
        for namespace in (torch, F, torch.Tensor):
            func = getattr(namespace, name, None)
            if func is not None:
                HANDLERS[func] = functools.partial(elementwise, func)
            func_ = getattr(namespace, name + "_", None)
            if func is not None and func_ is not None:
                HANDLERS[func_] = functools.partial(inplace, func)
    for name in _DUNDERS:
        func = getattr(torch.Tensor, f"__{name}__")
        HANDLERS[func] = functools.partial(elementwise, func)
    for name, base in _INPLACE_DUNDERS.items():
        HANDLERS[getattr(torch.Tensor, f"__{name}__")] = functools.partial(
            inplace, getattr(torch.Tensor, f"__{base}__")
        )


_register()
