"""The compute paths compared by ``sparkme-bench`` and how to build each one's encoder.

- ``sparse-gather`` / ``sparse-minkowski``: ``sparkme.sparsify`` with that conv backend, fp32;
  ``sparse-gather-bf16``: the gather backend under bf16 autocast (the stock ME kernels are fp32-only);
  ``sparse-triton`` / ``sparse-triton-bf16``: the fused Triton kernels (CUDA only; asked for by name);
- ``masked-dense``: SparK's reference emulation (``masked_dense.py``), fp32; its ``step`` is the official
  SparK step as written (``official.py``: gather-scatter densify, the paper's decoder, its loss);
  ``masked-dense-bf16-cl``: the same in bf16 autocast and channels-last (the fast GPU baseline);
- ``dense`` / ``dense-bf16-cl``: the plain network on the whole image (no masking at all).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

__all__ = ["Path", "PATHS", "default_paths", "build_encoder", "dense_backbone"]


@dataclass(frozen=True)
class Path:
    name: str
    kind: str  # "sparse" | "masked" | "dense"
    backend: str | None = None
    bf16: bool = False
    channels_last: bool = False


PATHS: dict[str, Path] = {
    path.name: path
    for path in (
        Path("sparse-gather", "sparse", backend="gather"),
        Path("sparse-gather-bf16", "sparse", backend="gather", bf16=True),
        Path("sparse-minkowski", "sparse", backend="minkowski"),
        Path("sparse-triton", "sparse", backend="triton"),
        Path("sparse-triton-bf16", "sparse", backend="triton", bf16=True),
        Path("masked-dense", "masked"),
        Path("masked-dense-bf16-cl", "masked", bf16=True, channels_last=True),
        Path("dense", "dense"),
        Path("dense-bf16-cl", "dense", bf16=True, channels_last=True),
    )
}


def default_paths(device: str) -> list[str]:
    """What ``paths: null`` runs: fp32 on the CPU; bf16 channels-last baselines added on the GPU (the
    Triton paths only when named: ``scripts/gpu_check.sh`` times them against the gather backend)."""
    if device.startswith("cuda"):
        return [name for name, path in PATHS.items() if path.backend != "triton"]
    return ["sparse-gather", "sparse-minkowski", "masked-dense", "dense"]


def get_path(name: str) -> Path:
    try:
        return PATHS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark path {name!r}; choose from {sorted(PATHS)}") from None


def _feature_indices(model_name: str) -> list[int]:
    probe = timm.create_model(model_name, pretrained=False, features_only=True)
    reductions = probe.feature_info.reduction()
    indices = [i for i, reduction in enumerate(reductions) if reduction >= 4]
    if not indices:
        raise ValueError(f"{model_name} has no feature map with stride >= 4 (feature strides {reductions})")
    return indices


def dense_backbone(model_name: str) -> nn.Module:
    """timm ``features_only`` model returning the maps of stride >= 4 (the sparse encoder's default stages)."""
    return timm.create_model(
        model_name, pretrained=False, features_only=True, out_indices=tuple(_feature_indices(model_name))
    )


def build_encoder(path: Path, model_name: str) -> nn.Module:
    """A fresh encoder for ``path`` (random init, weights seeded by the caller) exposing SparK's encoder attributes."""
    from sparkme.benchmarks.masked_dense import DenseEncoder, MaskedDenseEncoder

    if path.kind == "sparse":
        import sparkme

        return sparkme.sparsify(timm.create_model(model_name, pretrained=False), backend=path.backend)
    backbone = dense_backbone(model_name)
    encoder = MaskedDenseEncoder(backbone, model_name) if path.kind == "masked" else DenseEncoder(backbone, model_name)
    if path.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder
