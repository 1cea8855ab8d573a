"""sparkme-bench on volumes: the 3D masked-dense baseline's semantics, the preset, a tiny run, refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import sparkme
from sparkme.benchmarks.masked_dense import MaskedDenseEncoder, UnsupportedForMaskedDense
from sparkme.benchmarks.measure import Case, run_case
from sparkme.benchmarks.paths import VolumeFeatures, dense_backbone, volume_model
from sparkme.benchmarks.suite import cases_from_config, run_benchmark
from sparkme.models import ResNet3d


def _config(*overrides: str):
    with initialize_config_module(config_module="sparkme.conf", version_base="1.3"):
        return compose("bench", overrides=["bench=volume", *overrides])


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_masked_dense_volume_baseline_computes_what_the_sparse_engine_computes(norm: str) -> None:
    """Same math as the sparse engine on a ResNet3d, float64, train mode: features and weight gradients."""
    torch.manual_seed(0)
    model = ResNet3d(widths=(8, 16, 16, 24), depths=(1, 1, 1, 1), norm=norm).double()
    with torch.no_grad():  # non-trivial affine norms: a bias that reached hidden voxels would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d | torch.nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    encoder = sparkme.sparsify(model, backend="gather").train()
    baseline = MaskedDenseEncoder(VolumeFeatures(copy.deepcopy(model)), "resnet3d").train()
    assert baseline.feature_strides == encoder.feature_strides == [4, 8]
    volumes = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    visible = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.6
    sparse_maps, masked_maps = encoder(volumes, visible), baseline(volumes, visible)
    for sparse_map, masked in zip(sparse_maps, masked_maps, strict=True):
        assert masked.abs().max() > 1  # not trivially zero
        torch.testing.assert_close(sparse_map, masked, rtol=1e-9, atol=1e-9)
    weights = torch.randn(2, 24, 4, 4, 4, dtype=torch.float64)  # a loss that weighs every site differently
    for maps in (sparse_maps, masked_maps):
        (maps[-1] * weights).sum().backward()
    sparse_grads = dict(encoder.model.named_parameters())
    for name, param in baseline.backbone.named_parameters():
        torch.testing.assert_close(sparse_grads[name].grad, param.grad, rtol=1e-9, atol=1e-9, msg=name)


def test_volume_preset_is_the_documented_row() -> None:
    cases = cases_from_config(_config())
    assert {(c.model, c.batch, c.resolution, c.mask_ratio, c.measure) for c in cases} == {
        ("resnet3d", 1, 96, 0.6, "encoder")
    }
    assert [c.path for c in cases] == ["sparse-gather", "sparse-minkowski", "masked-dense", "dense"]
    assert dense_backbone("resnet3d").feature_info.reduction() == [4, 8, 16]


def test_tiny_volume_run_compares_every_cpu_path(tmp_path: Path) -> None:
    cfg = _config("models=[resnet3d_small]", "resolutions=[16]", "warmup=0", "isolate=false", "plot=false")
    rows = run_benchmark(cfg, tmp_path)
    assert [row["path"] for row in rows] == ["sparse-gather", "sparse-minkowski", "masked-dense", "dense"]
    assert all(row["error"] is None and row["ms"] > 0 for row in rows), [row["error"] for row in rows]
    assert next(row for row in rows if row["path"] == "masked-dense")["time_vs_ref"] == pytest.approx(1.0)
    assert "| resnet3d_small | encoder | 1 | 16 | 0.6 | sparse-gather |" in (tmp_path / "results.md").read_text()


def test_volume_inputs_are_one_channel_cubes_with_a_cube_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    forward = MaskedDenseEncoder.forward

    def spy(self, images, visible=None):
        seen.append((tuple(images.shape), tuple(visible.shape), int(visible.sum())))
        return forward(self, images, visible)

    monkeypatch.setattr(MaskedDenseEncoder, "forward", spy)
    case = Case(model="resnet3d_small", path="masked-dense", measure="encoder", batch=2, resolution=16,
                mask_ratio=0.6, warmup=0, iters=1)  # fmt: skip
    assert run_case(case)["error"] is None
    assert seen == [((2, 1, 16, 16, 16), (2, 1, 2, 2, 2), 2 * 3)]  # 8 cubes, 5 hidden per volume


def test_step_on_a_volume_model_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="official-step baseline .* is 2D only; use measures=\\[encoder\\]"):
        cases_from_config(_config("measures=[encoder,step]"))
    case = Case(model="resnet3d_small", path="dense", measure="step", batch=1, resolution=16, mask_ratio=0.6)
    with pytest.raises(ValueError, match="2D only"):
        run_case(case)


def test_masked_dense_refuses_instance_norm_with_running_statistics() -> None:
    model = volume_model("resnet3d_small")
    model.stem[1] = torch.nn.InstanceNorm3d(16, affine=True, track_running_stats=True)
    with pytest.raises(UnsupportedForMaskedDense, match="stem.1 is an InstanceNorm3d with running statistics"):
        MaskedDenseEncoder(VolumeFeatures(model), "resnet3d_small")
