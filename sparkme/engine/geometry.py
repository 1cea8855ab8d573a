"""Which convolution / pooling geometries keep exact sparse semantics (shared by the checker and the ops).

Every rule holds per spatial axis, so one code path serves 2-D and 3-D layers: a geometry's number
of dimensions is the length of its kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ntuple", "pair", "conv_geometry_problem", "pool_geometry_problem"]


def ntuple(value: int | Sequence[int], dims: int, name: str = "value") -> tuple[int, ...]:
    """``3 -> (3,) * dims``; a sequence of length ``dims`` (or 1) as a tuple of ints."""
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * dims
    if len(value) != dims:
        raise ValueError(f"{name} must be an int or {dims} ints, got {value!r}")
    return value


def pair(value: int | Sequence[int], name: str = "value") -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``."""
    return ntuple(value, 2, name)  # type: ignore[return-value]


def _centred(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d * (k // 2) for k, d in zip(kernel, dilation))


def _padding(padding: int | Sequence[int] | str, kernel: tuple[int, ...], dilation: tuple[int, ...]):
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * len(kernel)
        if padding == "same" and all(k % 2 == 1 for k in kernel):
            return _centred(kernel, dilation)
        return None
    return ntuple(padding, len(kernel), "padding")


def conv_geometry_problem(
    kernel: Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int] | str,
    dilation: int | Sequence[int],
) -> str | None:
    """Why a ConvNd geometry has no exact sparse twin, or None when it has one.

    Odd kernels must be centred (padding ``dilation * (k // 2)``): the sparse kernel is centred on
    the output site. Even kernels must tile (kernel == stride, padding 0, dilation 1), like
    ConvNeXt's 4x4/s4 stem and 2x2/s2 downsamples: MinkowskiEngine's even kernels cover offsets
    ``0 .. k-1``. Mixing odd and even sides is refused.
    """
    kernel = tuple(int(k) for k in kernel)
    dims = len(kernel)
    stride, dilation = ntuple(stride, dims, "stride"), ntuple(dilation, dims, "dilation")
    pad = _padding(padding, kernel, dilation)
    if pad is None:
        return f"padding={padding!r} is not supported (use integer padding k//2 for odd kernels)"
    odd = {k % 2 == 1 for k in kernel}
    if len(odd) > 1:
        return f"kernel {kernel} mixes odd and even sides; the sparse kernel cannot be placed like the dense one"
    if odd == {True}:
        want = _centred(kernel, dilation)
        if pad != want:
            return (
                f"padding {pad} with kernel {kernel} and dilation {dilation} is not centred (need padding {want}); "
                "off-centre or asymmetric padding shifts the dense grid against the sparse sites"
            )
        return None
    if pad != (0,) * dims or dilation != (1,) * dims or stride != kernel:
        return (
            f"even kernel {kernel} needs stride == kernel, padding 0 and dilation 1 "
            f"(got stride {stride}, padding {pad}, dilation {dilation}); otherwise its output grid "
            "does not match the dense one"
        )
    return None


def pool_geometry_problem(
    kind: str,
    kernel: int | Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
    divisor_override: int | None = None,
    dims: int = 2,
) -> tuple[str | None, bool]:
    """``(problem, tiles)`` for a ``dims``-d pooling layer: the reason it has no exact sparse twin (or
    None) and whether its windows tile the input (kernel == stride, padding 0).

    Tiling windows (any kernel, ``ceil_mode`` irrelevant because the encoder checks divisibility)
    pool over the active sites of each cell. Max pooling also accepts centred odd windows
    (padding ``k // 2``, no ``ceil_mode``): hidden sites act like -inf padding. Average pooling
    only tiles, since a centred window's divisor would count hidden sites in the dense model.
    """
    kernel = ntuple(kernel, dims, "kernel_size")
    stride = ntuple(stride, dims, "stride") if stride is not None and stride != [] else kernel
    padding, dilation = ntuple(padding, dims, "padding"), ntuple(dilation, dims, "dilation")
    if divisor_override:
        return f"{kind} with divisor_override={divisor_override} is not supported", False
    if kernel == stride and padding == (0,) * dims and dilation == (1,) * dims:
        return None, True
    if kind.startswith("max_pool") and all(k % 2 == 1 for k in kernel):
        want = _centred(kernel, dilation)
        if padding != want:
            return f"max pooling kernel {kernel} with padding {padding} is not centred (need {want})", False
        if ceil_mode:
            return "ceil_mode=True on an overlapping max pooling can add an output row the sparse grid lacks", False
        return None, False
    return (
        f"{kind} with kernel {kernel}, stride {stride}, padding {padding} has no exact sparse twin: "
        "only windows that tile the input (kernel == stride, padding 0) average over active sites"
    ), False
