"""SparseMap: a sparse activation that flows through a dense model's *unchanged* forward code.

A ``SparseMap`` holds the features of the active sites (``[N, C]``) and the MinkowskiEngine
coordinate map they live on. It answers the tensor protocol the model code uses between
modules (``shape``, ``permute``, ``+``, ``*``, ``mean``, activations, channel slices...), and
torch's ``__torch_function__`` sends ``F.conv2d``, ``F.batch_norm``, pooling and the rest to the
sparse implementations registered with :func:`implements` (``engine/layers/``). Every tensor
method of a map is defined here and dispatches like torch would dispatch ``torch.Tensor.<name>``.
Whatever has no sparse implementation raises :class:`UnsupportedLayerError` naming the op and the
module: the engine is never silently wrong.

Views behave like dense views: a ``permute`` or a channel slice shares its source's features, so
an in-place op on either is seen by both (the features live in one shared cell; in-place ops
compute out of place and rebind the cell, which keeps autograd simple).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .context import SparseContext, key_id
from .errors import UnsupportedLayerError

__all__ = ["SparseContext", "SparseMap", "implements", "key_id", "require_map"]

HANDLERS: dict[Callable, Callable] = {}


def implements(*funcs: Callable) -> Callable:
    """Register a sparse implementation for torch functions (``F.conv2d``, ``torch.mean``...)."""

    def register(handler: Callable) -> Callable:
        for func in funcs:
            HANDLERS[func] = handler
        return handler

    return register


class _Cell:
    """The features one map and all its views share; ``channels_last`` is the storage layout."""

    __slots__ = ("value", "channels_last")

    def __init__(self, value: torch.Tensor, channels_last: bool):
        self.value = value
        self.channels_last = channels_last


class SparseMap:
    """Features ``[N, C]`` at the active sites of a ``[B, C, H, W]`` map (or ``[B, H, W, C]`` after a
    ``permute(0, 2, 3, 1)``: ``channels_last``), or of a ``[B, C, D, H, W]`` volume map.
    ``tensor_stride`` is the map's stride in pixels, one entry per spatial axis."""

    __slots__ = ("_cell", "_channels", "key", "tensor_stride", "ctx", "channels_last")

    def __init__(
        self,
        features: torch.Tensor,
        key: Any,
        tensor_stride: tuple[int, ...],
        ctx: SparseContext,
        channels_last: bool = False,
    ):
        self._cell = _Cell(features, channels_last)
        self._channels: range | None = None  # a channel slice of the cell (a view), or all of it
        self.key = key
        self.tensor_stride = tuple(tensor_stride)
        self.ctx = ctx
        self.channels_last = channels_last

    # ---- features and views ----------------------------------------------------------------
    @property
    def features(self) -> torch.Tensor:
        value = self._cell.value
        if self._channels is None:
            return value
        return value[:, self._channels.start : self._channels.stop : self._channels.step]

    @features.setter
    def features(self, value: torch.Tensor) -> None:
        """Rebind the features (in-place ops): every view of the same cell sees the new values."""
        if self._channels is None:
            self._cell.value = value
            return
        full = self._cell.value.clone()
        full[:, self._channels.start : self._channels.stop : self._channels.step] = value
        self._cell.value = full

    def _view(self, channels_last: bool | None = None, channels: range | None = None) -> SparseMap:
        view = SparseMap.__new__(SparseMap)
        view._cell, view._channels = self._cell, channels if channels is not None else self._channels
        view.key, view.tensor_stride, view.ctx = self.key, self.tensor_stride, self.ctx
        view.channels_last = self.channels_last if channels_last is None else channels_last
        return view

    def with_features(self, features: torch.Tensor) -> SparseMap:
        """A new map (not a view) on the same sites and layout with features ``[N, C']``."""
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
        features = self.features
        grid = features.new_zeros(self.ctx.batch_size, *self.spatial_size, features.shape[1])
        sites = (coords[:, 0], *(coords[:, 1 + axis] // s for axis, s in enumerate(self.tensor_stride)))
        grid = grid.index_put(sites, features)
        return grid if self.channels_last else grid.permute(0, self.ndim - 1, *range(1, self.ndim - 1)).contiguous()

    # ---- tensor-like attributes ---------------------------------------------------------
    @property
    def spatial_size(self) -> tuple[int, ...]:
        return tuple(-(-side // stride) for side, stride in zip(self.ctx.image_size, self.tensor_stride))

    @property
    def shape(self) -> torch.Size:
        batch, channels, space = self.ctx.batch_size, self.features.shape[1], self.spatial_size
        if self.channels_last:
            return torch.Size((batch, *space, channels))
        return torch.Size((batch, channels, *space))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2 + self.ctx.spatial_dims

    ndim = property(dim)

    def __len__(self) -> int:
        return self.ctx.batch_size

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
        return self.ndim - 1 if self.channels_last else 1

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """The logical dims that are space: ``(2, 3)`` for ``[B, C, H, W]``, ``(1, 2)`` channels-last."""
        first = 1 if self.channels_last else 2
        return tuple(range(first, first + self.ctx.spatial_dims))

    @property
    def channels_last_format(self) -> torch.memory_format:
        """torch's channels-last memory format for this map's rank."""
        return torch.channels_last if self.ctx.spatial_dims == 2 else torch.channels_last_3d

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

    # ---- layout, contiguity, copies and channel slices ---------------------------------------
    def permute(self, *dims) -> SparseMap:
        """A view: only channels-first <-> channels-last keeps the sites' meaning."""
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        rank = self.ndim
        dims = tuple(d % rank for d in dims)
        space = tuple(range(1, rank - 1))
        if dims == tuple(range(rank)):
            return self._view()
        if not self.channels_last and dims == (0, *(d + 1 for d in space), 1):
            return self._view(channels_last=True)
        if self.channels_last and dims == (0, rank - 1, *space):
            return self._view(channels_last=False)
        raise UnsupportedLayerError(
            f"permute{dims} on a sparse map{self.ctx.where()}: only channels-first <-> channels-last is supported"
        )

    def is_contiguous(self, memory_format: torch.memory_format = torch.contiguous_format) -> bool:
        whole = self._channels is None or len(self._channels) == self._cell.value.shape[1]
        if memory_format == self.channels_last_format:
            return whole and self._cell.channels_last and not self.channels_last
        return whole and self._cell.channels_last == self.channels_last

    def contiguous(self, memory_format: torch.memory_format = torch.contiguous_format) -> SparseMap:
        """Self when already contiguous (like torch), else a copy: later in-place ops stay apart."""
        channels_last = self.channels_last_format
        if memory_format not in (torch.contiguous_format, channels_last, torch.preserve_format):
            raise UnsupportedLayerError(f"contiguous({memory_format}) on a sparse map{self.ctx.where()}")
        if memory_format == torch.preserve_format or self.is_contiguous(memory_format):
            return self
        if memory_format == channels_last and self.channels_last:
            raise UnsupportedLayerError(
                f"contiguous(channels_last) on a channels-last sparse map{self.ctx.where()}: its dims are not NCHW"
            )
        copy = self.with_features(self.features)
        copy._cell.channels_last = memory_format == channels_last or self.channels_last
        return copy

    def clone(self, *, memory_format: torch.memory_format = torch.preserve_format) -> SparseMap:
        return self.with_features(self.features.clone())

    def __getitem__(self, index) -> SparseMap:
        """Channel slices (``x[:, a:b]``, ``x[..., a:b]`` channels-last) are views; nothing else is
        sparse (an index over batch or space would mix hidden and visible sites)."""
        entries = index if isinstance(index, tuple) else (index,)
        if sum(e is Ellipsis for e in entries) > 1:
            raise UnsupportedLayerError(f"indexing a sparse map with {index!r}{self.ctx.where()}")
        rank = self.ndim
        if Ellipsis in entries:
            at = entries.index(Ellipsis)
            entries = entries[:at] + (slice(None),) * (rank - len(entries) + 1) + entries[at + 1 :]
        entries = entries + (slice(None),) * (rank - len(entries))
        channel = entries[self.channel_dim] if len(entries) == rank else None
        others = [e for d, e in enumerate(entries) if d != self.channel_dim]
        step = channel.step if isinstance(channel, slice) and channel.step is not None else 1
        if (
            not isinstance(channel, slice)
            or not isinstance(step, int)
            or step < 1
            or any(e != slice(None) for e in others)
        ):
            raise UnsupportedLayerError(
                f"indexing a sparse map of logical shape {tuple(self.shape)} with {index!r}{self.ctx.where()}: "
                "only slices of the channel dim keep sparse semantics"
            )
        current = self._channels if self._channels is not None else range(self._cell.value.shape[1])
        return self._view(channels=current[channel])

    # ---- torch protocol ----------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is None:
            raise UnsupportedLayerError(f"{func_name(func)} has no sparse implementation{_where(args, kwargs)}")
        signature = signature_of(handler)
        if signature is not None:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as err:
                raise UnsupportedLayerError(
                    f"{func_name(func)} with these arguments has no sparse implementation ({err}){_where(args, kwargs)}"
                ) from None
        return handler(*args, **kwargs)


class UnsupportedAttributeError(UnsupportedLayerError, AttributeError):
    """A tensor attribute a sparse map lacks (an AttributeError too, so ``hasattr`` stays quiet)."""


def _dispatching(name: str) -> Callable:
    """The method ``SparseMap.<name>``: what torch would dispatch for ``torch.Tensor.<name>``."""
    func = getattr(torch.Tensor, name)

    def method(self: SparseMap, *args, **kwargs):
        return SparseMap.__torch_function__(func, (SparseMap,), (self, *args), kwargs)

    method.__name__ = name
    return method


# Tensor methods a map answers (their sparse twins are registered for torch.Tensor.<name>).
# Every other dunder a tensor has is refused by name, so no Python protocol falls back to
# ``object``'s meaning (identity ``==``, truthiness, iteration) and gives a silent wrong answer.
# fmt: off
_METHODS = (
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__neg__", "__abs__", "__pow__", "__rpow__", "__ipow__",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "multiply", "multiply_", "divide", "divide_",
    "true_divide", "true_divide_", "neg", "neg_", "abs", "abs_", "sigmoid", "sigmoid_", "tanh", "tanh_", "relu",
    "relu_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip", "clip_", "square",
    "square_", "sqrt", "sqrt_", "rsqrt", "rsqrt_", "exp", "exp_", "pow", "pow_", "addcmul", "addcmul_",
    "addcdiv", "addcdiv_", "reciprocal", "reciprocal_", "erf", "erf_", "sign", "sign_", "lerp", "lerp_",
    "maximum", "minimum", "mean", "sum", "amax", "norm",
)
# fmt: on
# fmt: off
_OBJECT_PROTOCOL = {
    "__class__", "__init__", "__new__", "__init_subclass__", "__subclasshook__", "__getattribute__",
    "__getattr__", "__setattr__", "__delattr__", "__dir__", "__repr__", "__str__", "__format__", "__hash__",
    "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__", "__sizeof__", "__doc__", "__module__",
    "__dict__", "__weakref__", "__annotations__", "__torch_function__", "__torch_dispatch__",
}
# fmt: on


def _refused(name: str) -> Callable:
    def method(self: SparseMap, *args, **kwargs):
        raise UnsupportedLayerError(f"Tensor.{name} has no sparse implementation{self.ctx.where()}")

    method.__name__ = name
    return method


for _name in _METHODS:
    setattr(SparseMap, _name, _dispatching(_name))
for _name in dir(torch.Tensor):
    if (
        _name.startswith("__")
        and _name.endswith("__")
        and _name not in _OBJECT_PROTOCOL
        and callable(getattr(torch.Tensor, _name))
        and getattr(SparseMap, _name, None) is getattr(object, _name, None)
    ):
        setattr(SparseMap, _name, _refused(_name))
SparseMap.__hash__ = object.__hash__


def func_name(func: Callable) -> str:
    """``F.conv2d``, ``torch.mean``, ``Tensor.add_``: how a user would write the op."""
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"F.{name}"
    if module == "torch" or module.startswith("torch._C"):
        owner, _, short = name.rpartition(".")
        return f"Tensor.{short}" if owner in ("Tensor", "TensorBase") else f"torch.{short}"
    return name


def _where(args: tuple, kwargs: dict) -> str:
    ctx = next((a.ctx for a in tree_flatten((args, kwargs))[0] if isinstance(a, SparseMap)), None)
    return ctx.where() if ctx is not None else ""


@functools.cache
def signature_of(func: Callable) -> inspect.Signature | None:
    """``func``'s signature when it names its parameters (None for builtins and ``*args, **kwargs``)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return None if all(p.kind in variadic for p in signature.parameters.values()) else signature


def require_map(x: Any, op: str) -> SparseMap:
    if not isinstance(x, SparseMap):
        raise UnsupportedLayerError(f"{op} expected a sparse map as its input, got {type(x).__name__}")
    return x
