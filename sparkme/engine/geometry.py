"""Which convolution / pooling geometries keep exact sparse semantics (shared by the checker and the ops)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pair", "conv_geometry_problem", "pool_geometry_problem"]


def pair(value: int | Sequence[int], name: str = "value") -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return value  # type: ignore[return-value]


def _padding_pair(padding: int | Sequence[int] | str, kernel: tuple[int, int], dilation: tuple[int, int]):
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same" and all(k % 2 == 1 for k in kernel):
            return tuple(d * (k // 2) for k, d in zip(kernel, dilation))
        return None
    return pair(padding, "padding")


def conv_geometry_problem(
    kernel: Sequence[int], stride: Sequence[int], padding: int | Sequence[int] | str, dilation: Sequence[int]
) -> str | None:
    """Why a Conv2d geometry has no exact sparse twin, or None when it has one.

    Odd kernels must be centred (padding ``dilation * (k // 2)``): the sparse kernel is centred on
    the output site. Even kernels must tile (kernel == stride, padding 0, dilation 1), like
    ConvNeXt's 4x4/s4 stem and 2x2/s2 downsamples: MinkowskiEngine's even kernels cover offsets
    ``0 .. k-1``. Mixing odd and even sides is refused.
    """
    kernel, stride, dilation = pair(kernel), pair(stride), pair(dilation)
    pad = _padding_pair(padding, kernel, dilation)
    if pad is None:
        return f"padding={padding!r} is not supported (use integer padding k//2 for odd kernels)"
    odd = [k % 2 == 1 for k in kernel]
    if odd[0] != odd[1]:
        return f"kernel {kernel} mixes an odd and an even side; the sparse kernel cannot be placed like the dense one"
    if odd[0]:
        want = tuple(d * (k // 2) for k, d in zip(kernel, dilation))
        if pad != want:
            return (
                f"padding {pad} with kernel {kernel} and dilation {dilation} is not centred (need padding {want}); "
                "off-centre or asymmetric padding shifts the dense grid against the sparse sites"
            )
        return None
    if pad != (0, 0) or dilation != (1, 1) or stride != kernel:
        return (
            f"even kernel {kernel} needs stride == kernel, padding 0 and dilation 1 "
            f"(got stride {stride}, padding {pad}, dilation {dilation}); otherwise its output grid "
            "does not match the dense one"
        )
    return None


def pool_geometry_problem(
    kind: str,
    kernel: Sequence[int],
    stride: Sequence[int] | None,
    padding: int | Sequence[int],
    dilation: Sequence[int] = 1,
    ceil_mode: bool = False,
    divisor_override: int | None = None,
) -> tuple[str | None, bool]:
    """``(problem, tiles)`` for a pooling layer: the reason it has no exact sparse twin (or None) and
    whether its windows tile the input (kernel == stride, padding 0).

    Tiling windows (any kernel, ``ceil_mode`` irrelevant because the encoder checks divisibility)
    pool over the active sites of each cell. Max pooling also accepts centred odd windows
    (padding ``k // 2``, no ``ceil_mode``): hidden sites act like -inf padding. Average pooling
    only tiles, since a centred window's divisor would count hidden sites in the dense model.
    """
    kernel = pair(kernel)
    stride = pair(stride) if stride is not None and stride != [] else kernel
    padding, dilation = pair(padding), pair(dilation)
    if divisor_override:
        return f"{kind} with divisor_override={divisor_override} is not supported", False
    if kernel == stride and padding == (0, 0) and dilation == (1, 1):
        return None, True
    if kind == "max_pool2d" and all(k % 2 == 1 for k in kernel):
        want = tuple(d * (k // 2) for k, d in zip(kernel, dilation))
        if padding != want:
            return f"max pooling kernel {kernel} with padding {padding} is not centred (need {want})", False
        if ceil_mode:
            return "ceil_mode=True on an overlapping max pooling can add an output row the sparse grid lacks", False
        return None, False
    return (
        f"{kind} with kernel {kernel}, stride {stride}, padding {padding} has no exact sparse twin: "
        "only windows that tile the input (kernel == stride, padding 0) average over active sites"
    ), False
