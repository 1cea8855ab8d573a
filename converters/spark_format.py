"""Official SparK checkpoints (keyu-tian/SparK, ``pretrain/``), both ways.

The official code saves ``{"module": state_dict, "arch", "input_size", "epoch", ...}`` where the
SparK state dict holds the encoder under ``sparse_encoder.sp_cnn.`` (timm ResNet keys, or the
official ConvNeXt's ``downsample_layers``/``dwconv``/``pwconv`` keys), the decoder under
``dense_decoder.dec.<i>.up_sample``/``.conv`` and ``dense_decoder.proj``, and per scale
``densify_norms.<i>``, ``densify_projs.<i>`` (absent where it is the identity) and
``mask_tokens.<i>`` of shape ``[1, C, 1, 1]``, with scale ``i = 0`` the deepest. sparkme names the
same tensors ``encoder.model.*``, ``decoder.blocks.<i>.up``/``.conv``, ``decoder.head`` and
``densify.norms.<j>``/``projections.<j>``/``mask_tokens.<j>`` (``[C]``), ``j`` in the encoder's
scale order (shallowest first). Both are pure renames and reshapes, tested bitwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Export, base_model_name, timm_trunk_state_dict

__all__ = [
    "OFFICIAL_CONVNEXTS",
    "convnext_official_to_timm",
    "convnext_timm_to_official",
    "encoder_from_official",
    "from_spark",
    "is_official_spark",
    "scale_levels",
    "to_spark",
]

ENCODER = "sparse_encoder.sp_cnn."
DEPRECATED_BUFFERS = ("imn_m", "imn_s", "norm_black")  # registered by official SparK, never used
OFFICIAL_CONVNEXTS = frozenset({"convnext_tiny", "convnext_small", "convnext_base", "convnext_large"})

_TIMM_TO_OFFICIAL_CONVNEXT = (
    (r"^stem\.(\d+)\.", r"downsample_layers.0.\1."),
    (r"^stages\.(\d+)\.downsample\.(\d+)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"stages.\1.\2.pwconv\3."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.(norm\.|gamma$)", r"stages.\1.\2.\3"),
)
_OFFICIAL_TO_TIMM_CONVNEXT = (
    (r"^downsample_layers\.0\.(\d+)\.", r"stem.\1."),
    (r"^downsample_layers\.(\d+)\.(\d+)\.", r"stages.\1.downsample.\2."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv(\d)\.", r"stages.\1.blocks.\2.mlp.fc\3."),
    (r"^stages\.(\d+)\.(\d+)\.(norm\.|gamma$)", r"stages.\1.blocks.\2.\3"),
)
_DECODER_TO_OFFICIAL = (
    (r"^decoder\.blocks\.(\d+)\.up\.", r"dense_decoder.dec.\1.up_sample."),
    (r"^decoder\.blocks\.(\d+)\.conv\.", r"dense_decoder.dec.\1.conv."),
    (r"^decoder\.head\.", r"dense_decoder.proj."),
)
_DECODER_TO_SPARKME = (
    (r"^dense_decoder\.dec\.(\d+)\.up_sample\.", r"decoder.blocks.\1.up."),
    (r"^dense_decoder\.dec\.(\d+)\.conv\.", r"decoder.blocks.\1.conv."),
    (r"^dense_decoder\.proj\.", r"decoder.head."),
)
_SPARKME_DENSIFY = re.compile(r"^densify\.(norms|projections|mask_tokens)\.(\d+)(.*)$")
_OFFICIAL_DENSIFY = re.compile(r"^(densify_norms|densify_projs|mask_tokens)\.(\d+)(.*)$")
_DENSIFY_NAMES = {"norms": "densify_norms", "projections": "densify_projs", "mask_tokens": "mask_tokens"}


def _rename(key: str, rules: Sequence[tuple[str, str]]) -> str | None:
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return None


def convnext_timm_to_official(key: str) -> str:
    """timm ConvNeXt key -> the official (facebookresearch) ConvNeXt key SparK saves."""
    renamed = _rename(key, _TIMM_TO_OFFICIAL_CONVNEXT)
    if renamed is None:
        raise ValueError(f"{key!r} is not a timm ConvNeXt trunk key")
    return renamed


def convnext_official_to_timm(key: str) -> str:
    """Official (facebookresearch) ConvNeXt key -> timm ConvNeXt key."""
    renamed = _rename(key, _OFFICIAL_TO_TIMM_CONVNEXT)
    if renamed is None:
        raise ValueError(f"{key!r} is not an official ConvNeXt trunk key")
    return renamed


def scale_levels(state_dict: Mapping[str, Any]) -> list[int]:
    """Decoder level of each sparkme densify scale ``j`` (0 = deepest), read from the projection widths.

    A projection ``[W / 2**level, C, k, k]`` sits at ``level``; a scale without one (identity) is level 0.
    """
    width = state_dict["decoder.blocks.0.up.weight"].shape[0]
    count = 1 + max(int(m.group(2)) for key in state_dict if (m := _SPARKME_DENSIFY.match(key)))
    levels = []
    for index in range(count):
        projection = state_dict.get(f"densify.projections.{index}.weight")
        ratio = 1 if projection is None else width // projection.shape[0]
        levels.append(round(math.log2(ratio)))
    if sorted(levels) != list(range(count)):
        raise ValueError(
            f"densify scales sit at decoder levels {levels}; official SparK needs one scale per level 0..{count - 1}"
        )
    return levels


def _encoder_to_official(encoder: Mapping[str, torch.Tensor], model_name: str) -> tuple[dict, dict, list, list]:
    trunk, dropped, unmapped = timm_trunk_state_dict(encoder, model_name)
    notes = []
    if base_model_name(model_name) in OFFICIAL_CONVNEXTS:
        trunk = {convnext_timm_to_official(key): value for key, value in trunk.items()}
        notes.append(
            "encoder keys follow the official ConvNeXt (facebookresearch) layout, as SparK's models/convnext.py"
        )
    elif base_model_name(model_name).startswith("convnext"):
        notes.append(f"official SparK has no {model_name}: encoder keys stay timm's")
    return {ENCODER + key: value for key, value in trunk.items()}, dropped, unmapped, notes


def _config(module: Mapping[str, torch.Tensor], levels: list[int], options: Mapping[str, Any]) -> dict[str, Any]:
    norm = "bn" if any(key.startswith("densify_norms.") and "running_mean" in key for key in module) else "ln"
    return {
        "mask_ratio": float(options.get("mask_ratio", 0.6)),
        "densify_norm_str": norm,
        "sbn": bool(options.get("sync_bn", True)),
        "hierarchy": len(levels),
        "sparse_encoder.input_size": int(options.get("image_size", 224)),
        "dense_decoder.width": int(module["dense_decoder.dec.0.up_sample.weight"].shape[0]),
    }


def _rest_to_official(state_dict: Mapping[str, torch.Tensor], levels: list[int]) -> tuple[dict, list]:
    module, unmapped = {}, []
    for key, value in state_dict.items():
        if key.startswith("encoder."):
            continue
        if match := _SPARKME_DENSIFY.match(key):
            kind, index, rest = match.groups()
            if kind == "mask_tokens":
                value = value.reshape(1, -1, 1, 1)
            module[f"{_DENSIFY_NAMES[kind]}.{levels[int(index)]}{rest}"] = value
        elif (renamed := _rename(key, _DECODER_TO_OFFICIAL)) is not None:
            module[renamed] = value
        else:
            unmapped.append(key)
    return module, unmapped


def to_spark(state_dict: Mapping[str, Any], model_name: str, **options: Any) -> Export:
    """A sparkme SparK state dict -> an official SparK "with decoder" checkpoint (``torch.save``, ``.pth``).

    ``state_dict`` is ``SparK.state_dict()`` (``encoder.model.*``, ``decoder.*``, ``densify.*``) or a
    dense encoder state dict alone (then only ``sparse_encoder.sp_cnn.*`` is written). ``options``:
    ``image_size`` (224), ``mask_ratio`` (0.6), ``sync_bn`` (True), ``epoch`` (epochs done) recorded
    in the checkpoint's ``config`` and header. Load it with the official ``--init_weight=PATH``.
    """
    state = {key: value.detach().cpu() for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    full = any(key.startswith("decoder.") for key in state)
    encoder = {key.removeprefix("encoder.model."): v for key, v in state.items() if key.startswith("encoder.model.")}
    module, dropped, unmapped, notes = _encoder_to_official(encoder if full else state, model_name)
    if full:
        levels = scale_levels(state)
        rest, rest_unmapped = _rest_to_official(state, levels)
        unmapped += rest_unmapped
        module.update(rest)
        image_size = int(options.get("image_size", 224))
        module["imn_m"], module["imn_s"] = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
        module["norm_black"] = torch.zeros(1, 3, image_size, image_size)
        payload_module: dict[str, Any] = {**module, "config": _config(module, levels, options)}
    else:
        notes.append("encoder only: the official code keeps its freshly initialised decoder, densify and mask tokens")
        payload_module = dict(module)
    epoch = options.get("epoch")
    payload = {
        "arch": base_model_name(model_name),
        "input_size": int(options.get("image_size", 224)),
        "epoch": int(epoch) - 1 if epoch else -1,  # official: index of the last finished epoch
        "performance_desc": "exported by sparkme",
        "module": payload_module,
        "is_pretrain": True,
        "args": "exported by sparkme",
    }
    notes.append(
        "official SparK: main.py --init_weight=PATH (model weights only; strict=False like the official loader)"
    )
    return Export("spark", model_name, module, payload, ".pth", dropped, unmapped, notes)


def is_official_spark(state_dict: Mapping[str, Any]) -> bool:
    """True for an official SparK state dict ("with decoder" or its encoder alone under ``sparse_encoder``)."""
    return any(isinstance(key, str) and key.startswith(ENCODER) for key in state_dict)


def from_spark(
    state_dict: Mapping[str, Any], levels: Sequence[int] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An official SparK state dict (``checkpoint["module"]``) -> sparkme SparK keys.

    ``levels[j]`` is the decoder level of sparkme scale ``j`` (``SparK.levels``); by default the
    scales are taken as consecutive, shallowest first. Encoder keys come back as
    ``encoder.model.<timm key>`` (official ConvNeXt keys renamed to timm's). Returns the tensors and
    the keys left out with the reason (the deprecated buffers and the ``config`` entry).
    """
    count = sum(1 for key in state_dict if re.fullmatch(r"mask_tokens\.\d+", str(key)))
    levels = list(levels) if levels is not None else list(range(count - 1, -1, -1))
    if count and sorted(levels) != list(range(count)):
        raise ValueError(f"the checkpoint has {count} scales; sparkme's model sits at decoder levels {levels}")
    scale_of_level = {level: index for index, level in enumerate(levels)}
    encoder = encoder_from_official(
        {str(key)[len(ENCODER) :]: value for key, value in state_dict.items() if str(key).startswith(ENCODER)}
    )
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    for key, value in state_dict.items():
        if key == "config" or key in DEPRECATED_BUFFERS:
            dropped[key] = "official SparK bookkeeping, not weights"
        elif key.startswith(ENCODER):
            continue
        elif match := _OFFICIAL_DENSIFY.match(key):
            kind, level, rest = match.groups()
            kind = {v: k for k, v in _DENSIFY_NAMES.items()}[kind]
            if kind == "mask_tokens":
                value = value.reshape(-1)
            out[f"densify.{kind}.{scale_of_level[int(level)]}{rest}"] = value
        elif (renamed := _rename(key, _DECODER_TO_SPARKME)) is not None:
            out[renamed] = value
        else:
            raise ValueError(f"{key!r} is not a key of an official SparK checkpoint")
    out.update({"encoder.model." + key: value for key, value in encoder.items()})
    return out, dropped


def encoder_from_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official encoder-only file (timm ResNet keys or official ConvNeXt keys) -> timm keys.

    Keys outside the ConvNeXt trunk (a classifier's ``norm``/``head``) pass through unchanged.
    """
    if not any(key.startswith("downsample_layers.") for key in state_dict):
        return dict(state_dict)
    return {_rename(key, _OFFICIAL_TO_TIMM_CONVNEXT) or key: value for key, value in state_dict.items()}
