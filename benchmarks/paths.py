"""The compute paths compared by ``sparkme-bench`` and how to build each one's encoder.

- ``sparse-gather`` / ``sparse-minkowski``: ``sparkme.sparsify`` with that conv backend, fp32;
  ``sparse-gather-bf16``: the gather backend under bf16 autocast (the stock ME kernels are fp32-only);
  ``sparse-triton`` / ``sparse-triton-bf16``: the fused Triton kernels (CUDA only; asked for by name);
- ``masked-dense``: SparK's reference emulation (``masked_dense.py``), fp32; its ``step`` is the official
  SparK step as written (``official.py``: gather-scatter densify, the paper's decoder, its loss);
  ``masked-dense-bf16-cl``: the same in bf16 autocast and channels-last (the fast GPU baseline);
- ``dense`` / ``dense-bf16-cl``: the plain network on the whole image (no masking at all).

Models are timm CNN names, or a volume model of ``sparkme.models`` named by its ``model=`` config
(``resnet3d``, ``resnet3d_small``: conf/model/<name>.yaml), timed on 1-channel cubic volumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.models import FeatureInfo
from torch import nn

__all__ = [
    "Path",
    "PATHS",
    "VOLUME_MODELS",
    "default_paths",
    "build_encoder",
    "dense_backbone",
    "is_volume_model",
    "volume_model",
    "VolumeFeatures",
    "channels_last_format",
]

VOLUME_MODELS = ("resnet3d", "resnet3d_small")  # sparkme.models networks, by their conf/model/ config name


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


def is_volume_model(model_name: str) -> bool:
    """Whether ``model_name`` is one of sparkme's 3D networks (timed on volumes) rather than a timm CNN."""
    return model_name in VOLUME_MODELS


def _model_config(name: str) -> DictConfig:
    """conf/model/<name>.yaml with its defaults list (other model configs, ``_self_`` last unless placed) merged."""
    text = resources.files("sparkme.conf").joinpath("model", f"{name}.yaml").read_text()
    cfg = OmegaConf.create(text)
    defaults = list(cfg.pop("defaults", []))
    if "_self_" not in defaults:
        defaults.append("_self_")
    return OmegaConf.merge(*(cfg if entry == "_self_" else _model_config(entry) for entry in defaults))


def volume_model(model_name: str) -> nn.Module:
    """A fresh (random init) volume network from its ``model=`` config."""
    from hydra.utils import instantiate

    if not is_volume_model(model_name):
        raise ValueError(f"{model_name!r} is not a volume model; choose from {list(VOLUME_MODELS)}")
    return instantiate(_model_config(model_name))


class VolumeFeatures(nn.Module):
    """A ``ResNet3d``'s stem and stages returning the maps of reduction >= 4 (the sparse encoder's default
    stages), with timm's ``feature_info`` (``channels()``, ``reduction()``); state-dict keys as the model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stem, self.stages = model.stem, model.stages
        self.indices = [i for i, info in enumerate(model.feature_info) if info["reduction"] >= 4]
        self.feature_info = FeatureInfo(model.feature_info, tuple(self.indices))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, features = self.stem(x), []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in self.indices:
                features.append(x)
        return features


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """``channels_last`` for images, ``channels_last_3d`` for volumes."""
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def _feature_indices(model_name: str) -> list[int]:
    probe = timm.create_model(model_name, pretrained=False, features_only=True)
    reductions = probe.feature_info.reduction()
    indices = [i for i, reduction in enumerate(reductions) if reduction >= 4]
    if not indices:
        raise ValueError(f"{model_name} has no feature map with stride >= 4 (feature strides {reductions})")
    return indices


def dense_backbone(model_name: str) -> nn.Module:
    """timm ``features_only`` model (or ``VolumeFeatures``) returning the maps of stride >= 4 (the sparse
    encoder's default stages)."""
    if is_volume_model(model_name):
        return VolumeFeatures(volume_model(model_name))
    return timm.create_model(
        model_name, pretrained=False, features_only=True, out_indices=tuple(_feature_indices(model_name))
    )


def build_encoder(path: Path, model_name: str) -> nn.Module:
    """A fresh encoder for ``path`` (random init, weights seeded by the caller) exposing SparK's encoder attributes."""
    from sparkme.benchmarks.masked_dense import DenseEncoder, MaskedDenseEncoder

    if path.kind == "sparse":
        import sparkme

        if is_volume_model(model_name):
            return sparkme.sparsify(volume_model(model_name), backend=path.backend)
        return sparkme.sparsify(timm.create_model(model_name, pretrained=False), backend=path.backend)
    backbone = dense_backbone(model_name)
    encoder = MaskedDenseEncoder(backbone, model_name) if path.kind == "masked" else DenseEncoder(backbone, model_name)
    if path.channels_last:
        encoder = encoder.to(memory_format=channels_last_format(encoder.spatial_dims))
    return encoder
