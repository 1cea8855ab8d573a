"""SparK's loss and every gradient against a re-statement of the official code's formulas (float64).

The reference below re-states official SparK (``pretrain/spark.py`` forward, ``decoder.py``) step by
step with its own modules: masked densify through BatchNorm1d/LayerNorm of the active sites, mask
tokens ``[1, C, 1, 1]`` put in with ``torch.where``, the identity projection for the deepest scale
when its width equals the decoder's, the UNet decoder started from ``x = 0``, einsum patchify, the
unbiased per-patch variance and ``sum(l2 * hidden) / (num_hidden + 1e-8)`` (the count an int
tensor, so ``+ 1e-8`` happens in float32, where it vanishes, as in the official code). Weights are copied
module by module; the encoder (tested against the masked-dense reference in tests/engine) is a
deep copy of the masked-dense stand-in.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparkme.method import SparK


class OfficialUNetBlock(nn.Module):
    def __init__(self, up_sample: nn.Module, conv: nn.Module) -> None:
        super().__init__()
        self.up_sample, self.conv = up_sample, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up_sample(x))


class OfficialSpark(nn.Module):
    """Official SparK's densify + decoder + loss, weights copied from a sparkme model."""

    def __init__(self, model: SparK, norm_kind: str) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(model.encoder)
        self.patch = model.patch_size
        widths = list(reversed(self.encoder.feature_channels))  # deepest first
        decoder_width, f64 = model.decoder.width, torch.float64
        self.densify_norms, self.densify_projs, self.mask_tokens = nn.ModuleList(), nn.ModuleList(), nn.ParameterList()
        for i, width in enumerate(widths):
            j = len(widths) - 1 - i  # sparkme keeps the scales shallowest first
            norm = nn.BatchNorm1d(width, dtype=f64) if norm_kind == "bn" else nn.LayerNorm(width, eps=1e-6, dtype=f64)
            norm.load_state_dict(model.densify.norms[j].state_dict())
            self.densify_norms.append(norm)
            self.mask_tokens.append(nn.Parameter(model.densify.mask_tokens[j].detach().clone().view(1, -1, 1, 1)))
            if i == 0 and width == decoder_width:
                proj: nn.Module = nn.Identity()
            else:
                kernel = 1 if i == 0 else 3
                proj = nn.Conv2d(width, decoder_width, kernel, padding=kernel // 2, bias=True, dtype=f64)
                proj.load_state_dict(model.densify.projections[j].state_dict())
            self.densify_projs.append(proj)
            decoder_width //= 2
        self.dec = nn.ModuleList(
            OfficialUNetBlock(copy.deepcopy(block.up), copy.deepcopy(block.conv)) for block in model.decoder.blocks
        )
        self.proj = copy.deepcopy(model.decoder.head)

    def sparse_norm(self, norm: nn.Module, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        index = active.squeeze(1).nonzero(as_tuple=True)
        bhwc = x.permute(0, 2, 3, 1)
        out = torch.zeros_like(bhwc)
        out[index] = norm(bhwc[index])
        return out.permute(0, 3, 1, 2)

    def patchify(self, bchw: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = bchw.shape
        p, h, w = self.patch, height // self.patch, width // self.patch
        x = torch.einsum("bchpwq->bhwpqc", bchw.reshape(batch, channels, h, p, w, p))
        return x.reshape(batch, h * w, channels * p * p)

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        features = list(reversed(self.encoder(images, active)))
        current, to_dec = active, []
        for i, bcff in enumerate(features):
            bcff = self.sparse_norm(self.densify_norms[i], bcff, current)
            bcff = torch.where(current.expand_as(bcff), bcff, self.mask_tokens[i].expand_as(bcff))
            to_dec.append(self.densify_projs[i](bcff))
            current = current.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        x = 0
        for i, block in enumerate(self.dec):
            if i < len(to_dec):
                x = x + to_dec[i]
            x = block(x)
        inp, rec = self.patchify(images), self.patchify(self.proj(x))
        mean = inp.mean(dim=-1, keepdim=True)
        var = (inp.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        inp = (inp - mean) / var
        l2_loss = ((rec - inp) ** 2).mean(dim=2)
        non_active = active.logical_not().int().view(active.shape[0], -1)
        return l2_loss.mul_(non_active).sum() / (non_active.sum() + 1e-8)


def _parameter_pairs(model: SparK, reference: OfficialSpark) -> list[tuple[nn.Parameter, nn.Parameter, str]]:
    """(sparkme parameter, official parameter, name) for every parameter of both models."""
    pairs = [
        (p, q, f"encoder.{n}") for (n, p), q in zip(model.encoder.named_parameters(), reference.encoder.parameters())
    ]
    count = len(model.levels)
    for j in range(count):  # official scale index count - 1 - j
        mine = [*model.densify.norms[j].parameters(), *model.densify.projections[j].parameters()]
        theirs = [
            *reference.densify_norms[count - 1 - j].parameters(),
            *reference.densify_projs[count - 1 - j].parameters(),
        ]
        pairs += [(p, q, f"densify scale {j}") for p, q in zip(mine, theirs, strict=True)]
        pairs.append((model.densify.mask_tokens[j], reference.mask_tokens[count - 1 - j], f"mask token {j}"))
    theirs = [*reference.dec.parameters(), *reference.proj.parameters()]
    pairs += [(p, q, f"decoder.{n}") for (n, p), q in zip(model.decoder.named_parameters(), theirs, strict=True)]
    return pairs


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-12, floor: float = 1e-300) -> None:
    scale = b.abs().max().clamp_min(floor)
    error = ((a - b).abs().max() / scale).item()
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


@pytest.mark.parametrize(
    ("norm_kind", "decoder_width"),
    [("bn", 64), ("bn", 128), ("ln", 64)],  # width 64 = deepest channels: identity projection
)
def test_loss_and_every_gradient_match_the_official_formulas(stand_in_encoder, norm_kind, decoder_width):
    encoder = stand_in_encoder()
    encoder.norm_kind = norm_kind
    model = SparK(encoder, mask_ratio=0.6, decoder_width=decoder_width).double().train()
    with torch.no_grad():  # non-trivial affine norms so their gradients and values matter
        for norm in model.densify.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.1)
    reference = OfficialSpark(model, norm_kind).train()
    assert (decoder_width == 64) == isinstance(model.densify.projections[-1], nn.Identity)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 96, generator=generator, dtype=torch.float64)
    mask = model.sample_mask(images, generator)
    images_s, images_r = images.clone().requires_grad_(), images.clone().requires_grad_()
    loss, _, _ = model(images_s, mask=mask)
    loss_reference = reference(images_r, (~mask).unsqueeze(1))
    _close(loss.detach(), loss_reference.detach(), "loss", tol=1e-13)
    loss.backward()
    loss_reference.backward()
    _close(images_s.grad, images_r.grad, "input grad")

    pairs = _parameter_pairs(model, reference)
    assert len(pairs) == len(list(model.parameters())) == len(list(reference.parameters()))
    # a gradient that is zero in exact arithmetic (a conv bias before BatchNorm) is round-off: scale it
    # by the largest gradient (the channels-last decoder sums in another order than the reference)
    floor = 1e-3 * max(float(theirs.grad.abs().max()) for _, theirs, _ in pairs if theirs.grad is not None)
    for mine, theirs, what in pairs:
        assert theirs.grad is not None, what
        _close(mine.grad.view(theirs.grad.shape), theirs.grad, f"{what} grad", floor=floor)
    for j in range(len(model.levels)):  # BatchNorm running statistics of the visible sites
        theirs = reference.densify_norms[len(model.levels) - 1 - j].buffers()
        for (name, mine), their in zip(model.densify.norms[j].named_buffers(), theirs):
            _close(mine.double(), their.double(), f"densify norm {j} {name}")
