"""SparseMap: a sparse activation that flows through a dense model's *unchanged* forward code.

A ``SparseMap`` holds the features of the active sites (``[N, C]``) and the MinkowskiEngine
coordinate map they live on. It answers the tensor protocol the model code uses between
modules (``shape``, ``permute``, ``+``, ``*``, ``mean``, activations...), and torch's
``__torch_function__`` sends ``F.conv2d``, ``F.batch_norm``, ``F.layer_norm``, pooling and the
rest to sparse implementations registered with :func:`implements`. Whatever has no sparse
implementation raises :class:`UnsupportedLayerError` naming the op and the module: the engine
is never silently wrong.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from .errors import UnsupportedLayerError

__all__ = ["SparseContext", "SparseMap", "implements", "require_map"]

HANDLERS: dict[Callable, Callable] = {}


def implements(*funcs: Callable) -> Callable:
    """Register a sparse implementation for torch functions (``F.conv2d``, ``torch.mean``...)."""

    def register(handler: Callable) -> Callable:
        for func in funcs:
            HANDLERS[func] = handler
        return handler

    return register


def key_id(key: Any) -> tuple:
    """A hashable identity for a MinkowskiEngine ``CoordinateMapKey``."""
    stride, name = key.get_key()
    return (tuple(stride), name)


class SparseContext:
    """What every map of one forward pass shares: coordinates, batch, image size, conv backend."""

    def __init__(self, manager: Any, batch_size: int, image_size: tuple[int, int], conv_fn: Callable, device):
        self.manager = manager
        self.batch_size = batch_size
        self.image_size = image_size
        self.conv_fn = conv_fn
        self.device = torch.device(device)
        self.module_stack: list[str] = []
        self._coordinates: dict[tuple, torch.Tensor] = {}
        self._counts: dict[tuple, torch.Tensor] = {}

    def where(self) -> str:
        return f" in module {self.module_stack[-1]}" if self.module_stack else ""

    def coordinates(self, key: Any) -> torch.Tensor:
        """``[N, 3]`` int64 (batch, y, x) in pixel units, row-aligned with the features on ``key``."""
        ident = key_id(key)
        if ident not in self._coordinates:
            self._coordinates[ident] = self.manager.get_coordinates(key).long().to(self.device)
        return self._coordinates[ident]

    def batch_index(self, key: Any) -> torch.Tensor:
        return self.coordinates(key)[:, 0]

    def counts(self, key: Any) -> torch.Tensor:
        """Active sites per sample, ``[B]`` int64."""
        ident = key_id(key)
        if ident not in self._counts:
            self._counts[ident] = torch.bincount(self.batch_index(key), minlength=self.batch_size)
        return self._counts[ident]


class SparseMap:
    """Features ``[N, C]`` at the active sites of a ``[B, C, H, W]`` map (or ``[B, H, W, C]`` after a
    ``permute(0, 2, 3, 1)``: ``channels_last``). ``tensor_stride`` is the map's stride in pixels."""

    __slots__ = ("features", "key", "tensor_stride", "ctx", "channels_last")

    def __init__(
        self,
        features: torch.Tensor,
        key: Any,
        tensor_stride: tuple[int, int],
        ctx: SparseContext,
        channels_last: bool = False,
    ):
        self.features = features
        self.key = key
        self.tensor_stride = tuple(tensor_stride)
        self.ctx = ctx
        self.channels_last = channels_last

    # ---- construction helpers -------------------------------------------------------------
    def with_features(self, features: torch.Tensor) -> SparseMap:
        """Same sites and layout, new features (``[N, C']``)."""
        if features.dim() != 2 or features.shape[0] != self.features.shape[0]:
            raise UnsupportedLayerError(
                f"an operation turned sparse features {tuple(self.features.shape)} into {tuple(features.shape)}"
                f"{self.ctx.where()}; only per-site results can stay sparse"
            )
        return SparseMap(features, self.key, self.tensor_stride, self.ctx, self.channels_last)

    def sparse_tensor(self):
        """The MinkowskiEngine ``SparseTensor`` view of this map."""
        import MinkowskiEngine as ME

        return ME.SparseTensor(self.features, coordinate_map_key=self.key, coordinate_manager=self.ctx.manager)

    def dense(self) -> torch.Tensor:
        """Scatter into a dense tensor of the logical shape, zeros at inactive sites (differentiable)."""
        coords = self.ctx.coordinates(self.key)
        sy, sx = self.tensor_stride
        batch, height, width = self.ctx.batch_size, *self.spatial_size
        grid = self.features.new_zeros(batch, height, width, self.features.shape[1])
        grid = grid.index_put((coords[:, 0], coords[:, 1] // sy, coords[:, 2] // sx), self.features)
        return grid if self.channels_last else grid.permute(0, 3, 1, 2).contiguous()

    # ---- tensor-like attributes ---------------------------------------------------------
    @property
    def spatial_size(self) -> tuple[int, int]:
        (height, width), (sy, sx) = self.ctx.image_size, self.tensor_stride
        return (-(-height // sy), -(-width // sx))

    @property
    def shape(self) -> torch.Size:
        batch, channels, (height, width) = self.ctx.batch_size, self.features.shape[1], self.spatial_size
        if self.channels_last:
            return torch.Size((batch, height, width, channels))
        return torch.Size((batch, channels, height, width))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    ndim = property(dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def is_cuda(self) -> bool:
        return self.features.is_cuda

    @property
    def requires_grad(self) -> bool:
        return self.features.requires_grad

    @property
    def channel_dim(self) -> int:
        return 3 if self.channels_last else 1

    @property
    def spatial_dims(self) -> tuple[int, int]:
        return (1, 2) if self.channels_last else (2, 3)

    def contiguous(self, *args, **kwargs) -> SparseMap:
        return self

    def is_contiguous(self, *args, **kwargs) -> bool:
        return True

    def clone(self, *args, **kwargs) -> SparseMap:
        return self.with_features(self.features.clone())

    def new_empty(self, *args, **kwargs) -> torch.Tensor:
        return self.features.new_empty(*args, **kwargs)

    def new_zeros(self, *args, **kwargs) -> torch.Tensor:
        return self.features.new_zeros(*args, **kwargs)

    def new_ones(self, *args, **kwargs) -> torch.Tensor:
        return self.features.new_ones(*args, **kwargs)

    def new_full(self, *args, **kwargs) -> torch.Tensor:
        return self.features.new_full(*args, **kwargs)

    def new_tensor(self, *args, **kwargs) -> torch.Tensor:
        return self.features.new_tensor(*args, **kwargs)

    def __repr__(self) -> str:
        layout = "channels_last" if self.channels_last else "channels_first"
        return (
            f"SparseMap(shape={tuple(self.shape)}, sites={self.features.shape[0]}, "
            f"stride={self.tensor_stride}, {layout})"
        )

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        ctx = object.__getattribute__(self, "ctx")
        raise UnsupportedAttributeError(f"Tensor.{name} has no sparse implementation{ctx.where()}")

    # ---- layout ----------------------------------------------------------------------------
    def permute(self, *dims) -> SparseMap:
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        dims = tuple(d % 4 for d in dims)
        if dims == (0, 1, 2, 3):
            return self
        if not self.channels_last and dims == (0, 2, 3, 1):
            return SparseMap(self.features, self.key, self.tensor_stride, self.ctx, True)
        if self.channels_last and dims == (0, 3, 1, 2):
            return SparseMap(self.features, self.key, self.tensor_stride, self.ctx, False)
        raise UnsupportedLayerError(
            f"permute{dims} on a sparse map{self.ctx.where()}: only channels-first <-> channels-last is supported"
        )

    # ---- torch protocol ----------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if func in ELEMENTWISE:
            return elementwise(func, args, kwargs)
        name = getattr(func, "__name__", repr(func))
        if name.endswith("_") and not name.endswith("__"):
            out_of_place = ELEMENTWISE_BY_NAME.get(name[:-1])
            if out_of_place is not None:
                return inplace(out_of_place, args, kwargs)
        ctx = next((a.ctx for a in tree_flatten((args, kwargs))[0] if isinstance(a, SparseMap)), None)
        where = ctx.where() if ctx is not None else ""
        raise UnsupportedLayerError(f"{_func_name(func)} has no sparse implementation{where}")


class UnsupportedAttributeError(UnsupportedLayerError, AttributeError):
    """A tensor attribute a sparse map lacks (an AttributeError too, so ``hasattr`` stays quiet)."""


def _func_name(func: Callable) -> str:
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"F.{name}"
    if module == "torch" or module.startswith("torch._C"):
        return f"torch.{name}"
    return name


def require_map(x: Any, op: str) -> SparseMap:
    if not isinstance(x, SparseMap):
        raise UnsupportedLayerError(f"{op} expected a sparse map as its input, got {type(x).__name__}")
    return x


# ---- elementwise operations ------------------------------------------------------------------
def broadcast_rows(ref: SparseMap, value: torch.Tensor, op: str) -> torch.Tensor:
    """A dense operand that broadcasts against the map, as rows that broadcast against ``[N, C]``.

    Operands may vary per sample and per channel (layer-scale ``gamma``, an SE gate ``[B, C, 1, 1]``,
    drop-path's ``[B, 1, 1, 1]``, a GRN scale), never over space: hidden sites have no value.
    """
    if value.dim() == 0:
        return value
    if value.dim() > 4:
        raise UnsupportedLayerError(
            f"{op}: a {value.dim()}-d operand cannot broadcast onto a sparse map{ref.ctx.where()}"
        )
    full = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))
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


def _check_same_sites(maps: Iterable[SparseMap], op: str) -> SparseMap:
    maps = list(maps)
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


def elementwise(func: Callable, args: tuple, kwargs: dict) -> SparseMap:
    """Apply an elementwise op to the features; dense operands broadcast per sample / channel."""
    maps = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, SparseMap)]
    op = _func_name(func)
    ref = _check_same_sites(maps, op)
    if "out" in kwargs:
        raise UnsupportedLayerError(f"{op}(out=...) on a sparse map{ref.ctx.where()}")

    def convert(value):
        if isinstance(value, SparseMap):
            return value.features
        if isinstance(value, torch.Tensor):
            return broadcast_rows(ref, value, op)
        return value

    args, kwargs = tree_map(convert, args), tree_map(convert, kwargs)
    inplace_arg = _inplace_argument(func)
    if inplace_arg is not None:
        bound = inplace_arg.bind(*args, **kwargs)
        if bound.arguments.get("inplace"):
            bound.arguments["inplace"] = False
            target = maps[0]
            target.features = func(*bound.args, **bound.kwargs)
            return target
    return ref.with_features(func(*args, **kwargs))


def inplace(out_of_place: Callable, args: tuple, kwargs: dict) -> SparseMap:
    """``x.op_(...)``: compute out of place and rebind the target's features (keeps autograd simple)."""
    target = args[0]
    if not isinstance(target, SparseMap):
        raise UnsupportedLayerError(
            f"in-place {_func_name(out_of_place)} writes a sparse map into a dense tensor; this cannot stay sparse"
        )
    result = elementwise(out_of_place, args, kwargs)
    target.features = result.features
    return target


@functools.cache
def _inplace_argument(func: Callable) -> inspect.Signature | None:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    return signature if "inplace" in signature.parameters else None


_ELEMENTWISE_TORCH = [
    "add",
    "sub",
    "subtract",
    "mul",
    "multiply",
    "div",
    "divide",
    "true_divide",
    "addcmul",
    "addcdiv",
    "neg",
    "negative",
    "abs",
    "sigmoid",
    "tanh",
    "relu",
    "exp",
    "sqrt",
    "rsqrt",
    "pow",
    "square",
    "clamp",
    "clamp_min",
    "clamp_max",
    "clip",
    "maximum",
    "minimum",
    "where",
    "erf",
    "sign",
    "reciprocal",
    "lerp",
    "hardswish",
]
_ELEMENTWISE_F = [
    "relu",
    "relu6",
    "hardtanh",
    "gelu",
    "silu",
    "mish",
    "hardswish",
    "hardsigmoid",
    "sigmoid",
    "tanh",
    "leaky_relu",
    "elu",
    "selu",
    "celu",
    "softplus",
    "dropout",
    "alpha_dropout",
    "logsigmoid",
]
_DUNDERS = [
    "__add__",
    "__radd__",
    "__sub__",
    "__rsub__",
    "__mul__",
    "__rmul__",
    "__truediv__",
    "__rtruediv__",
    "__neg__",
    "__pow__",
    "add",
    "sub",
    "mul",
    "div",
    "sigmoid",
    "tanh",
    "relu",
    "clamp",
]

ELEMENTWISE: set[Callable] = set()
ELEMENTWISE_BY_NAME: dict[str, Callable] = {}
for _name in _ELEMENTWISE_TORCH:
    if hasattr(torch, _name):
        ELEMENTWISE.add(getattr(torch, _name))
        ELEMENTWISE_BY_NAME[_name] = getattr(torch, _name)
for _name in _ELEMENTWISE_F:
    if hasattr(F, _name):
        ELEMENTWISE.add(getattr(F, _name))
        ELEMENTWISE_BY_NAME.setdefault(_name, getattr(F, _name))
for _name in _DUNDERS:
    if hasattr(torch.Tensor, _name):
        ELEMENTWISE.add(getattr(torch.Tensor, _name))


def _binary(func: Callable, reflected: bool = False) -> Callable:
    def method(self: SparseMap, other):
        return elementwise(func, (other, self) if reflected else (self, other), {})

    return method


def _rebinding(func: Callable) -> Callable:
    def method(self: SparseMap, *args, **kwargs):
        return inplace(func, (self, *args), kwargs)

    return method


def _unary(func: Callable) -> Callable:
    def method(self: SparseMap, *args, **kwargs):
        return elementwise(func, (self, *args), kwargs)

    return method


for _dunder, _func in {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.div}.items():
    setattr(SparseMap, f"__{_dunder}__", _binary(_func))
    setattr(SparseMap, f"__r{_dunder}__", _binary(_func, reflected=True))
    setattr(SparseMap, f"__i{_dunder}__", _rebinding(_func))
SparseMap.__neg__ = _unary(torch.neg)
SparseMap.__pow__ = _unary(torch.pow)
for _name in ("add", "sub", "mul", "div", "sigmoid", "tanh", "relu", "clamp", "clamp_min", "clamp_max", "abs",
              "square", "sqrt", "exp", "neg", "addcmul", "addcdiv", "pow"):  # fmt: skip
    _func = getattr(torch, _name)
    setattr(SparseMap, _name, _unary(_func))
    setattr(SparseMap, f"{_name}_", _rebinding(_func))
SparseMap.multiply = SparseMap.mul
SparseMap.divide = SparseMap.div
SparseMap.__hash__ = object.__hash__
