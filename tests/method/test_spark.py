"""SparK on a masked-dense stand-in encoder: wiring, shapes, errors, reconstruction, param groups."""

from __future__ import annotations

import pytest
import torch

import sparkme
from sparkme.method import LightDecoder, SparK, random_patch_mask
from sparkme.method.loss import patchify, unpatchify
from sparkme.method.spark import no_weight_decay_names
from sparkme.training.optim import param_groups


@pytest.mark.parametrize(
    ("strides", "size", "levels"),
    [
        ((4, 8, 16, 32), (64, 96), [3, 2, 1, 0]),
        ((2, 4, 8, 16), (32, 48), [3, 2, 1, 0]),
        ((8, 16, 32), (64, 32), [2, 1, 0]),
    ],
)
def test_shapes_and_decoder_wiring(stand_in_encoder, strides, size, levels):
    model = SparK(stand_in_encoder(strides), decoder_width=64)
    assert model.levels == levels
    assert 2 ** len(model.decoder.blocks) == strides[-1]  # upsample all the way to the input resolution
    *finer, deepest = model.densify.projections
    identity = model.encoder.feature_channels[-1] == 64  # deepest width equals the decoder's (official rule)
    assert isinstance(deepest, torch.nn.Identity) == identity
    widths = [proj.out_channels for proj in (finer if identity else [*finer, deepest])]
    assert widths == [64 // 2**level for level in levels[: len(widths)]]
    loss, pred, mask = model(torch.randn(2, 3, *size))
    grid = (size[0] // strides[-1], size[1] // strides[-1])
    assert pred.shape == (2, 3, *size) and mask.shape == (2, *grid) and mask.dtype == torch.bool
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(token.grad is not None and token.grad.abs().sum() > 0 for token in model.densify.mask_tokens)


def test_mask_is_reproducible_and_counts_hidden_patches(stand_in_encoder):
    model = SparK(stand_in_encoder(), mask_ratio=0.6, decoder_width=32)
    images = torch.randn(3, 3, 96, 64)
    _, _, mask = model(images, generator=torch.Generator().manual_seed(1))
    _, _, again = model(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)
    assert mask.flatten(1).sum(1).tolist() == [4, 4, 4]  # 6 - round(6 * 0.4)


def test_hidden_pixels_reach_the_loss_only_through_the_target(stand_in_encoder):
    model = SparK(stand_in_encoder(), decoder_width=32)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[[True, False], [False, True]], [[False, True], [True, True]]])
    hidden = mask.repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1)
    changed = torch.where(hidden, torch.randn_like(images), images)
    loss, pred, _ = model(images, mask=mask)
    loss_changed, pred_changed, _ = model(changed, mask=mask)
    assert torch.equal(pred, pred_changed)
    assert not torch.equal(loss, loss_changed)


def test_bad_inputs_get_clear_errors(stand_in_encoder):
    model = SparK(stand_in_encoder(), decoder_width=32)
    with pytest.raises(ValueError, match="not a multiple of the encoder.s total stride 32"):
        model(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="at least one patch must be hidden and one visible"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="mask must be bool"):
        model(torch.randn(1, 3, 64, 64), mask=torch.zeros(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_ratio"):
        SparK(stand_in_encoder(), mask_ratio=1.0)
    with pytest.raises(ValueError, match="power of two"):
        SparK(stand_in_encoder((12, 32)))
    with pytest.raises(TypeError, match="sparsify"):
        SparK(torch.nn.Conv2d(3, 3, 1))


def test_reconstruct_pastes_visible_patches_and_undoes_patch_statistics(stand_in_encoder, monkeypatch):
    model = SparK(stand_in_encoder(), decoder_width=32).eval()
    images = torch.randn(2, 3, 64, 96)
    out = model.reconstruct(images, generator=torch.Generator().manual_seed(0))
    hidden = out["mask"].repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1).expand_as(images)
    assert torch.equal(out["input"], images)
    assert torch.equal(out["reconstruction"][~hidden], images[~hidden])
    assert torch.count_nonzero(out["masked"][hidden]) == 0 and torch.equal(out["masked"][~hidden], images[~hidden])

    def perfect(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        patches = patchify(images, 32)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        return unpatchify((patches - mean) / (var + 1e-6).sqrt(), 32)

    monkeypatch.setattr(model, "predict", perfect)
    assert torch.allclose(model.reconstruct(images)["reconstruction"], images, atol=1e-5)


def test_param_groups_exclude_biases_norms_and_mask_embeddings(stand_in_encoder):
    model = SparK(stand_in_encoder(), decoder_width=32)
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {name: id(p) for name, p in model.named_parameters()}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name in ("densify.mask_tokens.0", "densify.norms.0.weight", "decoder.head.bias", "encoder.stages.0.0.bias"):
        assert ids[name] in no_decay_ids
    decay_ids = {id(p) for p in decay["params"]}
    for name in ("decoder.blocks.0.up.weight", "densify.projections.1.weight", "encoder.stages.0.0.weight"):
        assert ids[name] in decay_ids
    assert len(decay_ids | no_decay_ids) == len(ids) and not decay_ids & no_decay_ids


def test_trainer_groups_follow_the_same_no_weight_decay_rule(stand_in_encoder):
    model = SparK(stand_in_encoder(), decoder_width=32)
    model.encoder.register_parameter("mask_token", torch.nn.Parameter(torch.zeros(1, 4, 1, 1)))  # by name
    names = {id(p): name for name, p in model.named_parameters()}
    trainer_decay, trainer_plain = param_groups(model)
    method_decay, method_plain = model.param_groups(0.05)
    assert [names[id(p)] for p in trainer_decay["params"]] == [names[id(p)] for p in method_decay["params"]]
    assert {names[id(p)] for p in trainer_plain["params"]} == {names[id(p)] for p in method_plain["params"]}
    assert {names[id(p)] for p in method_plain["params"]} == no_weight_decay_names(model)
    assert "encoder.mask_token" in no_weight_decay_names(model)


def test_top_level_exports():
    assert (sparkme.SparK, sparkme.LightDecoder, sparkme.random_patch_mask) == (SparK, LightDecoder, random_patch_mask)
