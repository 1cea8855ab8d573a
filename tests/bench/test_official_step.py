"""The whole-step baseline (the official SparK step as written) computes sparkme.SparK's loss and gradients."""

from __future__ import annotations

import re

import pytest
import timm
import torch

import sparkme
from sparkme.benchmarks.masked_dense import MaskedDenseEncoder
from sparkme.benchmarks.measure import Case, run_case
from sparkme.benchmarks.official import OfficialSparK
from sparkme.benchmarks.paths import dense_backbone

RTOL = 1e-8  # float64; BatchNorm over a few visible sites amplifies round-off to ~1e-10


def _source_key(key: str) -> str:
    """The timm model's key of a ``features_only`` key (which flattens the top level: "stages_0" -> "stages.0")."""
    return re.sub(r"^([a-z]+)_(\d+)\.", r"\1.\2.", key)


def _pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``sparkme.SparK`` on the sparse engine and ``OfficialSparK`` on masked-dense, same weights, float64."""
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False)
    spark = sparkme.SparK(sparkme.sparsify(dense, backend="gather"), mask_ratio=0.5, decoder_width=64)
    backbone = dense_backbone(name)
    source = dense.state_dict()
    backbone.load_state_dict({key: source[_source_key(key)] for key in backbone.state_dict()})
    official = OfficialSparK(MaskedDenseEncoder(backbone, name), mask_ratio=0.5, decoder_width=64)
    head = {k: v for k, v in spark.state_dict().items() if not k.startswith("encoder.")}
    missing, unexpected = official.load_state_dict(head, strict=False)
    assert not unexpected and all(k.startswith("encoder.") for k in missing), (missing, unexpected)
    return spark.double().train(), official.double().train()


def _grads(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): p.grad for k, p in model.named_parameters() if not k.startswith("encoder.")}


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_official_step_matches_sparkme_in_float64(name: str) -> None:
    spark, official = _pair(name)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=generator, dtype=torch.float64)
    mask = torch.rand(2, 12, generator=generator).argsort(dim=1).lt(6).view(2, 3, 4)
    results = []
    for model in (spark, official):
        loss, pred, _ = model(images, mask=mask)
        loss.backward()
        results.append((loss.detach(), pred.detach(), _grads(model, "")))
    (loss_s, pred_s, grads_s), (loss_o, pred_o, grads_o) = results
    torch.testing.assert_close(loss_o, loss_s, rtol=RTOL, atol=0)
    torch.testing.assert_close(pred_o, pred_s, rtol=RTOL, atol=RTOL * pred_s.abs().max().item())
    assert grads_s.keys() == grads_o.keys()
    for key, grad in grads_s.items():
        torch.testing.assert_close(grads_o[key], grad, rtol=RTOL, atol=RTOL * grad.abs().max().item(), msg=key)
    sparse_encoder = dict(spark.encoder.model.named_parameters())
    for key, param in official.encoder.backbone.named_parameters():
        reference = sparse_encoder[_source_key(key)].grad
        torch.testing.assert_close(param.grad, reference, rtol=RTOL, atol=RTOL * reference.abs().max().item(), msg=key)


def test_masked_dense_step_runs_the_official_step(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    original = OfficialSparK.__init__

    def spy(self, *args, **kwargs) -> None:
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(OfficialSparK, "__init__", spy)
    case = Case(model="resnet18", path="masked-dense", measure="step", batch=2, resolution=64, mask_ratio=0.6, iters=1)
    row = run_case(case)
    assert built == ["OfficialSparK"] and row["error"] is None and row["ms"] > 0 and row["peak_mib"] >= 0
