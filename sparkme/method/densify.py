"""Densify: turn each scale's sparse features into a dense map the decoder can read.

Per scale (paper section 3.2): normalize the features of the active (visible) sites only,
fill every hidden site with that scale's learnable mask embedding ``[M_i]``, then project to
the decoder's width at that scale (``phi_i``). As in official SparK, a projection is the
identity when a scale is marked so (the deepest one when its width equals the decoder's), mask
embeddings start from a normal of std 0.02 truncated at +-0.02, and projections keep
PyTorch's default Conv2d init. Images give 4-d maps ``[B, C, H, W]``, volumes 5-d maps
``[B, C, D, H, W]`` (``spatial_dims=3``: Conv3d projections); both go through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparkme.method.decoder import dense_layers

__all__ = ["ActiveRows", "Densify", "NORM_KINDS", "init_mask_token"]

NORM_KINDS = ("bn", "ln")


def init_mask_token(token: torch.Tensor) -> None:
    """Official SparK mask-embedding init: normal, std 0.02, truncated at +-0.02 (one std)."""
    nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)


@dataclass(frozen=True)
class ActiveRows:
    """One scale's active sites as rows: ``features`` ``[N, C]`` at ``sites`` (batch, y, x) of a (B, H, W) map,
    or (batch, z, y, x) of a (B, D, H, W) map.

    What a sparse encoder already holds (``SparseEncoder.forward_maps``): densify can normalize these
    rows and scatter them once, instead of reading them back out of a dense map.
    """

    features: torch.Tensor
    sites: tuple[torch.Tensor, ...]
    shape: tuple[int, ...]


def _active_site_norm(norm_kind: str, channels: int) -> nn.Module:
    """Normalization over the ``[N, C]`` rows of the active sites: BN for BN-nets, LN for LN-nets."""
    if norm_kind == "bn":
        return nn.BatchNorm1d(channels)
    if norm_kind == "ln":
        return nn.LayerNorm(channels, eps=1e-6)
    raise ValueError(f"norm_kind must be one of {NORM_KINDS} (got {norm_kind!r}): 'bn' for BatchNorm nets, else 'ln'")


def _projection(in_channels: int, out_channels: int, kernel_size: int | None, spatial_dims: int) -> nn.Module:
    """``phi_i``: a ``kernel_size`` conv (2D or 3D) to the decoder width, or the identity for ``kernel_size=None``."""
    if kernel_size is None:
        if in_channels != out_channels:
            raise ValueError(f"an identity projection needs equal widths (got {in_channels} -> {out_channels})")
        return nn.Identity()
    conv = dense_layers(spatial_dims)[0]
    return conv(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2, bias=True)


class Densify(nn.Module):
    """Normalize, mask-embed and project a list of per-scale features.

    ``forward(features, visible)`` takes dense encoder maps ``[B, C_i, H_i, W_i]`` (values at hidden
    sites are ignored) and bool maps ``[B, H_i, W_i]`` that are True at visible sites, and returns
    ``[B, out_channels[i], H_i, W_i]`` (with a depth axis ``D_i`` before ``H_i`` when ``spatial_dims=3``).
    Statistics of the normalization use visible sites only, so the zeros an encoder leaves at hidden
    sites never reach BatchNorm's batch statistics. A ``kernel_sizes`` entry of ``None`` makes that
    scale's projection the identity.
    """

    def __init__(
        self,
        in_channels: list[int],
        out_channels: list[int],
        norm_kind: str,
        kernel_sizes: list[int | None],
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if not len(in_channels) == len(out_channels) == len(kernel_sizes):
            raise ValueError(
                f"one entry per scale needed: got {len(in_channels)} input widths, {len(out_channels)} "
                f"output widths and {len(kernel_sizes)} kernel sizes"
            )
        dense_layers(spatial_dims)  # refuses a rank other than 2 or 3
        self.norm_kind = norm_kind
        self.spatial_dims = spatial_dims
        self.norms = nn.ModuleList(_active_site_norm(norm_kind, channels) for channels in in_channels)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(channels)) for channels in in_channels)
        for token in self.mask_tokens:
            init_mask_token(token)
        self.projections = nn.ModuleList(
            _projection(cin, cout, k, spatial_dims)
            for cin, cout, k in zip(in_channels, out_channels, kernel_sizes, strict=True)
        )

    def densify_scale(self, index: int, features: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Dense map of scale ``index`` before projection: normalized features, mask embedding elsewhere
        (``[B, C, H, W]`` or ``[B, C, D, H, W]`` with channels-last strides)."""
        batch, channels, *sides = features.shape
        if len(sides) != self.spatial_dims or visible.shape != (batch, *sides):
            raise ValueError(
                f"scale {index}: features {tuple(features.shape)} do not match the visible map "
                f"{tuple(visible.shape)}; the encoder's feature_strides must describe its outputs"
            )
        sites = features.movedim(1, -1)
        scattered = self._normalized_active_sites(index, sites, visible)
        token = self.mask_tokens[index].to(scattered.dtype)
        dense = torch.where(visible.unsqueeze(-1), scattered, token)
        return dense.movedim(-1, 1)  # channels-last strides; forward makes it contiguous

    @torch.compiler.disable  # a data-dependent number of rows: torch.compile runs it eagerly
    def fill_rows(self, index: int, rows: ActiveRows) -> torch.Tensor:
        """Dense map of scale ``index`` before projection, from its active rows: the rows normalized and
        scattered into a map of mask embeddings. Returned ``[B, C, *sides]`` with channels-last strides."""
        normed = self._normalize_rows(index, rows.features)
        token = self.mask_tokens[index].to(normed.dtype)
        grid = token.expand(*rows.shape, token.shape[0]).clone(memory_format=torch.contiguous_format)
        return grid.index_put_(rows.sites, normed).movedim(-1, 1)

    def _normalize_rows(self, index: int, active: torch.Tensor) -> torch.Tensor:
        if self.training and self.norm_kind == "bn" and active.shape[0] < 2:
            raise ValueError(
                f"scale {index} has {active.shape[0]} visible site(s) in the whole batch; BatchNorm needs at "
                f"least 2 in training: use a larger batch or images, or a lower mask_ratio"
            )
        return self.norms[index](active)

    @torch.compiler.disable  # a data-dependent number of rows: torch.compile runs it eagerly
    def _normalized_active_sites(self, index: int, sites: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``sites`` ``[B, *sides, C]``: the visible rows normalized (statistics over them only), zeros elsewhere."""
        active = self._normalize_rows(index, sites[visible])
        return sites.new_zeros(*sites.shape[:-1], active.shape[-1]).index_put((visible,), active)

    def forward(self, features: list[torch.Tensor], visible: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.projections) or len(visible) != len(self.projections):
            raise ValueError(
                f"expected {len(self.projections)} scales, got {len(features)} feature maps "
                f"and {len(visible)} visible maps"
            )
        out = []  # a loop, not a comprehension: torch.compile resumes after the eager part of each scale
        for i, (projection, feats, vis) in enumerate(zip(self.projections, features, visible)):
            out.append(projection(self.densify_scale(i, feats, vis).contiguous()))
        return out
