"""SparK: sparse masked modeling with a hierarchical decoder (the method core).

``loss, pred, mask = SparK(encoder)(images)``: hide patches, encode the visible ones with a
sparse encoder, densify every scale with mask embeddings, decode with the light UNet and
score the reconstruction on hidden patches only. The encoder's ``spatial_dims`` picks images
(2, the default) or volumes (3: cubic patches, 3D densify projections and decoder); one code path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparkme.method.decoder import LightDecoder
from sparkme.method.densify import NORM_KINDS, ActiveRows, Densify
from sparkme.method.loss import masked_patch_mse, patch_stats, patchify, unpatchify
from sparkme.method.masking import check_mask_grid, check_mask_ratio, patch_grid_of, random_grid_mask, upsample_mask

__all__ = [
    "SparK",
    "active_rows",
    "decoder_levels",
    "input_channels",
    "no_weight_decay_names",
    "projection_kernels",
    "split_weight_decay",
]

MEMORY_FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}


def decoder_levels(feature_strides: list[int], patch_size: int) -> list[int]:
    """Decoder level of each encoder scale: ``log2(patch_size / stride)`` (0 = deepest).

    Refuses strides that do not divide the patch side by a power of two, repeated strides, and
    hierarchies whose deepest stride is not the patch side (the decoder starts there).
    """
    levels = []
    for stride in feature_strides:
        ratio = patch_size // stride if stride > 0 and patch_size % stride == 0 else 0
        if ratio < 1 or 2 ** round(math.log2(ratio)) != ratio:
            raise ValueError(
                f"feature stride {stride} does not divide the patch side {patch_size} (the encoder's "
                f"downsample_ratio) by a power of two; strides must be {patch_size}/2**k, e.g. 4, 8, 16, 32"
            )
        levels.append(round(math.log2(ratio)))
    if len(set(levels)) != len(levels):
        raise ValueError(f"feature strides {list(feature_strides)} repeat a stride; give one feature map per stride")
    if 0 not in levels:
        raise ValueError(
            f"no feature map at the patch side {patch_size}: the deepest stride in {list(feature_strides)} "
            f"must equal the encoder's downsample_ratio"
        )
    return levels


def projection_kernels(levels: list[int], channels: list[int], widths: list[int]) -> list[int | None]:
    """Densify projection kernel per scale, as official SparK: the deepest map gets a 1x1 conv (or the
    identity when its width already equals the decoder's, paper eq. 1), finer maps a 3x3 conv that also
    mixes each visible site with the mask embeddings around it."""
    return [
        (None if cin == cout else 1) if level == 0 else 3
        for level, cin, cout in zip(levels, channels, widths, strict=True)
    ]


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names of trainable parameters that are not weight-decayed: biases and norm scales (at most one
    dimension) and mask embeddings (by name, whatever their shape). The one no-weight-decay rule:
    :meth:`SparK.param_groups` and the trainer's optimizer groups both split with :func:`split_weight_decay`.
    """
    return {
        name
        for name, param in module.named_parameters()
        if param.requires_grad and (param.ndim <= 1 or "mask" in name.lower())
    }


def split_weight_decay(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of ``module`` as ``(decayed, not decayed)`` by :func:`no_weight_decay_names`."""
    skip = no_weight_decay_names(module)
    decay, plain = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (plain if name in skip else decay).append(param)
    return decay, plain


def active_rows(sparse_map) -> ActiveRows:
    """The rows of a sparse encoder's :class:`~sparkme.engine.sparse_map.SparseMap` and where they sit
    (coordinate rows ``[batch, y, x]`` or ``[batch, z, y, x]`` in finest-grid units, one stride per axis)."""
    coords = sparse_map.ctx.coordinates(sparse_map.key)
    strides = tuple(sparse_map.tensor_stride)
    sites = (coords[:, 0], *(coords[:, 1 + axis] // stride for axis, stride in enumerate(strides)))
    return ActiveRows(sparse_map.features, sites, (sparse_map.ctx.batch_size, *sparse_map.spatial_size))


def input_channels(encoder: nn.Module, spatial_dims: int) -> int:
    """Channels SparK feeds the encoder and reconstructs: 3 (RGB) for images; for volumes the encoder's
    ``in_channels`` (the first convolution's input channels, e.g. 1 for CT, 4 for multi-sequence MRI)."""
    channels = getattr(encoder, "in_channels", None)
    if spatial_dims == 2:
        if channels is not None and int(channels) != 3:
            raise ValueError(
                f"SparK on images reconstructs RGB pixels; encoder {type(encoder).__name__} takes "
                f"{channels} input channels (give it a 3-channel first convolution)"
            )
        return 3
    if channels is None:
        raise TypeError(
            f"a 3D encoder must say how many channels a volume has: {type(encoder).__name__} has no "
            f"'in_channels' (sparkme.sparsify(cnn3d) sets it)"
        )
    return int(channels)


class SparK(nn.Module):
    """Masked pretraining model around a sparse encoder.

    ``encoder`` is called as ``encoder(images, visible)`` with ``visible`` bool ``[B, 1, h, w]`` at
    patch resolution and returns one dense map per scale (zeros at hidden sites); it exposes
    ``feature_channels``, ``feature_strides``, ``downsample_ratio`` (= patch side) and ``norm_kind``.
    ``sparkme.sparsify(cnn)`` returns such an encoder. An encoder with ``spatial_dims == 3`` (and
    ``in_channels``) takes volumes ``[B, C, D, H, W]`` and ``visible`` ``[B, 1, d, h, w]``; masks,
    predictions and losses then have a depth axis too.
    """

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.6,
        decoder_width: int = 768,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        for attribute in ("feature_channels", "feature_strides", "downsample_ratio", "norm_kind"):
            if not hasattr(encoder, attribute):
                raise TypeError(
                    f"encoder {type(encoder).__name__} has no attribute {attribute!r}; "
                    f"wrap the dense network with sparkme.sparsify(cnn)"
                )
        channels, strides = list(encoder.feature_channels), list(encoder.feature_strides)
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"encoder gives {len(channels)} feature_channels but {len(strides)} feature_strides")
        if encoder.norm_kind not in NORM_KINDS:
            raise ValueError(f"encoder.norm_kind must be one of {NORM_KINDS} (got {encoder.norm_kind!r})")
        self.spatial_dims = int(getattr(encoder, "spatial_dims", 2))
        if self.spatial_dims not in MEMORY_FORMATS:
            raise ValueError(f"encoder.spatial_dims must be 2 (images) or 3 (volumes), got {self.spatial_dims}")
        self.in_channels = input_channels(encoder, self.spatial_dims)
        self.encoder = encoder
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(encoder.downsample_ratio)
        self.feature_strides = strides
        self.levels = decoder_levels(strides, self.patch_size)
        self.decoder = LightDecoder(decoder_width, self.patch_size, self.in_channels, self.spatial_dims)
        widths = [self.decoder.level_widths[level] for level in self.levels]
        kernels = projection_kernels(self.levels, channels, widths)
        self.densify = Densify(channels, widths, encoder.norm_kind, kernels, self.spatial_dims)
        # speed only (same values and gradients up to round-off): densify from the encoder's sparse
        # maps when it has them; the dense part (projections, decoder) in channels-last layout
        self.densify_from_maps = True
        self.channels_last = True

    def sample_mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh random mask ``[B, h, w]`` (``[B, d, h, w]`` for volumes; True = hidden) for ``images``."""
        self._check_images(images)
        grid = check_mask_grid(images.shape[2:], self.patch_size, self.mask_ratio)
        return random_grid_mask(images.shape[0], grid, self.mask_ratio, generator, device=images.device)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(loss, pred, mask)``.

        ``pred`` is the decoder output ``[B, 3, H, W]`` (``[B, C, D, H, W]`` for volumes) in the target
        space (per-patch normalized pixels when ``norm_pix_loss``); ``mask`` is bool ``[B, h, w]``
        (``[B, d, h, w]``), True where a patch was hidden.
        A ``mask`` may be passed instead of sampling one (e.g. to compare runs).
        """
        mask = self.sample_mask(images, generator) if mask is None else self._check_mask(mask, images)
        pred = self.predict(images, mask)
        loss = masked_patch_mse(pred, images, mask, self.patch_size, self.norm_pix_loss)
        return loss, pred, mask

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder output (shaped like ``images``) for ``images`` with the patches of ``mask`` hidden."""
        visible = ~mask
        if self.densify_from_maps and hasattr(self.encoder, "forward_maps"):
            filled = self._filled_from_maps(images, visible)
        else:
            filled = self._filled_from_dense(images, visible)
        memory_format = MEMORY_FORMATS[self.spatial_dims] if self.channels_last else torch.contiguous_format
        decoder_inputs: list[torch.Tensor | None] = [None] * len(self.decoder.level_widths)
        for level, projection, dense in zip(self.levels, self.densify.projections, filled):
            decoder_inputs[level] = projection(dense.contiguous(memory_format=memory_format))
        return self.decoder(decoder_inputs)

    def _filled_from_dense(self, images: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        """Any encoder: its dense maps, the visible sites read back out by the mask at each scale."""
        features = self.encoder(images, visible.unsqueeze(1))
        self._check_scales(len(features))
        visible_maps = [
            upsample_mask(visible, self.patch_size // stride, self.spatial_dims) for stride in self.feature_strides
        ]
        return [self.densify.densify_scale(i, f, v) for i, (f, v) in enumerate(zip(features, visible_maps))]

    @torch.compiler.disable  # sparse maps and data-dependent row counts: eager under torch.compile
    def _filled_from_maps(self, images: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        """A sparse encoder: its active rows normalized and scattered once per scale (no dense map of
        features, no mask gather)."""
        maps = self.encoder.forward_maps(images, visible.unsqueeze(1))
        self._check_scales(len(maps))
        visible_patches = int(visible.sum())
        filled = []
        for i, (sparse_map, stride) in enumerate(zip(maps, self.feature_strides)):
            rows = active_rows(sparse_map)
            expected = visible_patches * (self.patch_size // stride) ** self.spatial_dims
            if rows.features.shape[0] != expected:
                raise RuntimeError(
                    f"scale {i} (stride {stride}) has {rows.features.shape[0]} active sites, the mask makes "
                    f"{expected} visible; the encoder's active sites must be the visible patches"
                )
            filled.append(self.densify.fill_rows(i, rows))
        return filled

    def _check_scales(self, count: int) -> None:
        if count != len(self.levels):
            raise ValueError(f"encoder returned {count} maps but lists {len(self.levels)} feature_strides")

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Images ready to plot, in the same (normalized) space as ``images``.

        Returns ``input``, ``masked`` (hidden patches set to 0), ``reconstruction`` (prediction with
        each hidden patch's own mean/std restored and the visible patches pasted back) and ``mask``.
        Runs in the module's current mode: call ``eval()`` first for BatchNorm running statistics.
        """
        mask = self.sample_mask(images, generator) if mask is None else self._check_mask(mask, images)
        pred = self.predict(images, mask)
        if self.norm_pix_loss:
            mean, std = patch_stats(patchify(images, self.patch_size))
            pred = unpatchify(patchify(pred, self.patch_size) * std + mean, self.patch_size, images.shape[1])
        hidden = upsample_mask(mask, self.patch_size, self.spatial_dims).unsqueeze(1)
        return {
            "input": images,
            "masked": images.masked_fill(hidden, 0.0),
            "reconstruction": torch.where(hidden, pred.to(images.dtype), images),
            "mask": mask,
        }

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two optimizer groups: ``weight_decay`` for weights, 0 for biases, norms and mask embeddings."""
        decay, plain = split_weight_decay(self)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 2 + self.spatial_dims or images.shape[1] != self.in_channels:
            layout = "[B, 3, H, W]" if self.spatial_dims == 2 else f"volumes [B, {self.in_channels}, D, H, W]"
            raise ValueError(f"images must be {layout} (got shape {tuple(images.shape)})")

    def _check_mask(self, mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        expected = (images.shape[0], *patch_grid_of(images.shape[2:], self.patch_size))
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(
                f"mask must be bool {list(expected)} (True = hidden patch); got {mask.dtype} {list(mask.shape)}"
            )
        if mask.flatten(1).all(dim=1).any() or not mask.flatten(1).any(dim=1).all():
            raise ValueError("every sample's mask must hide at least one patch and leave at least one visible")
        return mask.to(images.device)
