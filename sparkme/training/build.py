"""Build the pretraining model from plain configs, refusing bad input before any training."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from sparkme.errors import UserError

__all__ = [
    "plain_config",
    "instantiate_unwrapped",
    "build_dense_model",
    "build_spark",
    "spark_from_dense",
    "check_model_name",
    "check_batch_settings",
    "model_name_of",
]


def plain_config(node: Any) -> Any:
    """An OmegaConf node as plain (resolved) dicts and lists; anything else unchanged."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def instantiate_unwrapped(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises the target's own error (a clear message) unwrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError | TypeError | FileNotFoundError | ImportError):
            raise error.__cause__ from None
        raise


def model_name_of(model_cfg: Mapping[str, Any]) -> str | None:
    """The timm architecture name of a ``timm.create_model`` config, else None."""
    name = model_cfg.get("model_name")
    return str(name) if name is not None else None


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know, listing the closest ones it does."""
    import timm

    known = timm.list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the full list"
    raise ValueError(f"unknown model {name!r}{hint} (set model.model_name=..., or model=custom for your own network)")


def build_dense_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Instantiate the dense CNN of a Hydra ``model`` config (``_target_`` plus keyword arguments)."""
    from omegaconf import OmegaConf

    cfg = dict(model_cfg)
    if "_target_" not in cfg:
        raise ValueError(f"model config needs a _target_ (e.g. timm.create_model); got keys {sorted(cfg)}")
    if cfg["_target_"] in ("timm.create_model", "timm.models.create_model") and cfg.get("model_name"):
        check_model_name(str(cfg["model_name"]))
        if cfg.get("pretrained"):
            raise ValueError(
                "model.pretrained=true needs a download; sparkme pretrains from scratch (pretrained=false)"
            )
    model = instantiate_unwrapped(OmegaConf.create(cfg), _convert_="all")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model config {cfg['_target_']} built a {type(model).__name__}, not a torch nn.Module")
    return model


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def check_batch_settings(batch_size: Any, accum_steps: Any, world_size: int) -> int:
    """The per-rank micro-batch of the global ``train.batch_size`` split over ranks and accumulation steps."""
    batch_size = _positive_int("train.batch_size (the global batch over all ranks and accumulation steps)", batch_size)
    accum_steps = _positive_int("train.accum_steps", accum_steps)
    per_step = world_size * accum_steps
    if batch_size % per_step:
        lower = batch_size // per_step * per_step
        hint = f"{lower} or {lower + per_step}" if lower else str(per_step)
        raise UserError(
            f"train.batch_size={batch_size} (the global batch) is not a multiple of world size {world_size} "
            f"x train.accum_steps {accum_steps} = {per_step}; use e.g. train.batch_size={hint}"
        )
    return batch_size // per_step


def spark_from_dense(
    dense: nn.Module,
    spark_cfg: Mapping[str, Any],
    backend: str | None = None,
    sync_bn: bool = False,
    stages: Sequence[str] | None = None,
) -> nn.Module:
    """``sparkme.SparK(sparkme.sparsify(dense), **spark_cfg)``.

    With ``sync_bn`` every BatchNorm (the encoder's, densify's and the decoder's) becomes a
    :class:`~sparkme.engine.layers.sync_bn.SparseSyncBatchNorm`: under DDP its statistics cover
    the visible sites of all ranks. The dense model is converted before ``sparsify`` so the
    encoder is built from the synchronised modules.
    """
    import sparkme
    from sparkme.engine.layers.sync_bn import convert_sync_batchnorms

    if sync_bn:
        dense = convert_sync_batchnorms(dense)
    encoder = sparkme.sparsify(dense, stages=stages)
    if backend:
        encoder.set_backend(backend)
    model = sparkme.SparK(encoder, **dict(spark_cfg))
    if sync_bn:
        for name, child in list(model.named_children()):
            if child is not encoder:
                model.add_module(name, convert_sync_batchnorms(child))
    return model


def build_spark(
    model_cfg: Mapping[str, Any], spark_cfg: Mapping[str, Any], backend: str | None = None, sync_bn: bool = False
) -> nn.Module:
    """Dense model of ``model_cfg`` -> :func:`spark_from_dense` (``sync_bn``: BatchNorms synchronised over ranks)."""
    return spark_from_dense(build_dense_model(model_cfg), spark_cfg, backend=backend, sync_bn=sync_bn)
