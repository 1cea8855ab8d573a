"""Compute backends for sparse convolutions.

A backend is a function with the signature of ``SparseConvFn``: it takes a
MinkowskiEngine ``SparseTensor`` and a convolution's *dense-layout* parameters
(``weight`` shaped ``[out, in // groups, kh, kw]`` exactly like ``nn.Conv2d``) and
returns the output ``SparseTensor`` on the same coordinate manager.

Semantics every backend must keep (the exactness tests check them all):
- odd kernels are centred (dense padding ``k // 2``); even kernels cover offsets
  ``0 .. k-1`` (dense padding 0);
- a stride-1 convolution computes only at the input's active sites, from active
  neighbours only (submanifold);
- a strided convolution's output sites are the stride cells holding an active input
  (``coordinate_manager.stride``), exactly like MinkowskiEngine's.

Backends register themselves in ``BACKENDS``; ``"minkowski"`` is MinkowskiEngine's
stock kernels, ``"gather"`` is sparkme's gather-GEMM-scatter path on ME's kernel maps,
``"triton"`` its fused gather-GEMM kernel for CUDA tensors (Triton, imported on first use).
A backend registered with ``autocast=True`` computes in autocast's dtype (bf16 on tensor cores):
the encoder then runs its sparse forward inside the caller's autocast instead of forcing fp32
(MinkowskiEngine's kernels take fp32/fp64 only).
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["SparseConvFn", "BACKENDS", "DEFAULT_BACKEND", "get_backend", "register_backend", "supports_autocast"]


class SparseConvFn(Protocol):
    def __call__(
        self,
        x: object,  # MinkowskiEngine.SparseTensor
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        stride: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> object: ...


BACKENDS: dict[str, SparseConvFn] = {}
_AUTOCAST: set[str] = set()
DEFAULT_BACKEND = "gather"


def register_backend(name: str, fn: SparseConvFn, *, autocast: bool = False) -> None:
    """Make ``fn`` selectable as backend ``name``; ``autocast``: it honours ``torch.autocast``."""
    BACKENDS[name] = fn
    if autocast:
        _AUTOCAST.add(name)
    else:
        _AUTOCAST.discard(name)


def supports_autocast(name: str) -> bool:
    """Whether backend ``name`` computes in autocast's dtype (else the encoder runs it in fp32)."""
    get_backend(name)
    return name in _AUTOCAST


def get_backend(name: str) -> SparseConvFn:
    if not BACKENDS:
        _load_builtin()
    if name not in BACKENDS:
        _load_builtin()
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown sparse backend {name!r}; available: {sorted(BACKENDS)}") from None


def _load_builtin() -> None:
    import importlib

    for module in ("minkowski", "gather", "triton_gather"):
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module}":
                raise
