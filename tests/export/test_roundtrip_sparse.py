"""Round trip from the SPARSE encoder: export its weights, load them with the consumer's own
loader, and check the dense model reproduces the sparse encoder's features on a fully visible
image (where SparK's sparse encoding must equal the dense network)."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import sparkme
from sparkme.converters import convert, save_export
from sparkme.converters.detectron2_format import d2_resnet_key

from .conftest import randomized_model
from .test_torchvision_format import torchvision_trunk

SIZE = 64


def stage_outputs(model: torch.nn.Module, stage_names: list[str], images: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the named modules of a dense model (the encoder's stages), via forward hooks."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: outputs.__setitem__(name, output)
        )
        for name in stage_names
    ]
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[name] for name in stage_names]


def assert_features_match(dense: list[torch.Tensor], sparse: list[torch.Tensor]) -> None:
    assert len(dense) == len(sparse) == 4
    for ours, theirs in zip(dense, sparse, strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3 * theirs.abs().max().item())  # float32 sum order


def sparse_features(name: str) -> tuple[sparkme.SparseEncoder, torch.Tensor, list[torch.Tensor]]:
    encoder = sparkme.sparsify(randomized_model(name, seed=3)).eval()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    visible = torch.ones(2, 1, SIZE // encoder.downsample_ratio, SIZE // encoder.downsample_ratio, dtype=torch.bool)
    with torch.no_grad():
        features = encoder(images, visible)
    return encoder, images, features


@pytest.fixture(scope="module")
def resnet18_sparse():
    return sparse_features("resnet18")


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_timm_safetensors_reproduce_sparse_encoder(name, tmp_path):
    encoder, images, features = sparse_features(name)
    assert encoder.feature_strides == [4, 8, 16, 32]
    export = convert(encoder.dense_state_dict(), encoder.model_name or name, "safetensors")
    path = save_export(export, tmp_path / "w.safetensors")
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=3)
    dense = stage_outputs(loaded.eval(), [stage.name for stage in encoder.stages], images)
    assert_features_match(dense, features)


def test_torchvision_reproduces_sparse_encoder(resnet18_sparse, tmp_path):
    encoder, images, features = resnet18_sparse
    path = save_export(convert(encoder.dense_state_dict(), "resnet18", "torchvision"), tmp_path / "tv.pth")
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    result = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    with torch.no_grad():
        assert_features_match(torchvision_trunk(model, images), features)


def test_mmdet_backbone_reproduces_sparse_encoder(resnet18_sparse, tmp_path):
    """mmdet's ResNet shares torchvision's names: strip the prefix as mmengine does, load, compare."""
    encoder, images, features = resnet18_sparse
    path = save_export(convert(encoder.dense_state_dict(), "resnet18", "mmdet"), tmp_path / "mm.pth")
    checkpoint = torch.load(path, weights_only=True)["state_dict"]
    backbone = {key.removeprefix("backbone."): value for key, value in checkpoint.items()}
    model = torchvision.models.resnet18(weights=None).eval()
    assert sorted(model.load_state_dict(backbone, strict=False).missing_keys) == ["fc.bias", "fc.weight"]
    with torch.no_grad():
        assert_features_match(torchvision_trunk(model, images), features)


def test_detectron2_arrays_are_the_sparse_encoders_weights(resnet18_sparse):
    encoder, _, _ = resnet18_sparse
    dense = encoder.dense_state_dict()
    model = convert(dense, "resnet18", "detectron2").state_dict
    expected = {d2_resnet_key(k): v for k, v in dense.items() if not k.startswith("fc.") and "num_batches" not in k}
    assert set(model) == set(expected)
    for key, value in expected.items():
        assert (model[key] == value.numpy()).all(), key


def test_checkpoint_to_timm_through_the_cli(tmp_path):
    """SparK model -> checkpoint (the trainer's writer) -> sparkme-export -> timm: same features."""
    from sparkme.cli.export import main
    from sparkme.training.checkpoint import save_checkpoint

    encoder, images, features = sparse_features("resnet18")
    spark = sparkme.SparK(encoder, decoder_width=64)
    model_cfg = {"_target_": "timm.create_model", "model_name": "resnet18", "pretrained": False}
    payload = {
        "model": spark.state_dict(),
        "encoder": spark.encoder.dense_state_dict(),
        "model_cfg": model_cfg,
        "model_name": "resnet18",
        "spark_cfg": {"decoder_width": 64},
        "step": 0,
        "epoch": 0,
    }
    checkpoint = save_checkpoint(tmp_path / "last.pth", payload)
    for source in (checkpoint, tmp_path / "last.encoder.safetensors"):
        out = tmp_path / f"from_{source.suffix[1:]}.safetensors"
        assert main([str(source), "--format", "safetensors", "--out", str(out)]) == 0
        loaded = timm.create_model(
            "resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), num_classes=6
        )
        dense = stage_outputs(loaded.eval(), [stage.name for stage in encoder.stages], images)
        assert_features_match(dense, features)
