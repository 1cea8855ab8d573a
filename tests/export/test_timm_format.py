"""timm / safetensors export: loaded back by timm's own pretrained loader, outputs unchanged."""

from __future__ import annotations

import pytest
import timm
import torch

from sparkme.converters import FORMATS, UnsupportedArchitectureError, convert, save_export


def _load_with_timm(name: str, path, num_classes: int) -> torch.nn.Module:
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=num_classes
    ).eval()


@pytest.mark.parametrize("format", ["timm", "safetensors"])
def test_resnet_loads_through_timm_pretrained_path(format, resnet18, images, tmp_path):
    export = convert(resnet18.state_dict(), "resnet18", format)
    assert set(export.dropped) == {"fc.weight", "fc.bias"}
    assert export.unmapped == []
    assert not any(key.startswith("fc.") for key in export.state_dict)
    path = save_export(export, tmp_path / f"weights{export.suffix}")

    loaded = _load_with_timm("resnet18", path, num_classes=7)
    assert loaded.get_classifier().out_features == 7
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), resnet18.forward_features(images))
    for key, value in export.state_dict.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_safetensors_metadata_names_the_model(resnet18, tmp_path):
    from safetensors import safe_open

    path = save_export(convert(resnet18.state_dict(), "resnet18", "safetensors"), tmp_path / "w.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["model_name"] == "resnet18"
        assert handle.metadata()["format"] == "timm"


def test_default_class_count_fails_as_documented(resnet18, tmp_path):
    """With num_classes equal to the default (1000) timm loads strictly: the note tells users to pick K."""
    export = convert(resnet18.state_dict(), "resnet18", "safetensors")
    assert any("num_classes" in note or "K must differ" in note for note in export.notes)
    path = save_export(export, tmp_path / "w.safetensors")
    with pytest.raises(RuntimeError, match="fc.weight"):
        _load_with_timm("resnet18", path, num_classes=1000)
    assert _load_with_timm("resnet18", path, num_classes=0).num_classes == 0


def test_convnext_features_only_keys_are_renamed_and_load(convnext_atto, images, tmp_path):
    features = timm.create_model("convnext_atto", pretrained=False, features_only=True)
    trunk = {k: v for k, v in convnext_atto.state_dict().items() if not k.startswith("head")}
    features.load_state_dict({key.replace(".", "_", 1): value for key, value in trunk.items()})
    flattened = features.state_dict()
    assert "stem_0.weight" in flattened  # timm flattens top-level sequentials in features_only wrappers

    export = convert(flattened, "convnext_atto", "safetensors")
    assert export.unmapped == [] and export.dropped == {}
    path = save_export(export, tmp_path / "w.safetensors")
    loaded = _load_with_timm("convnext_atto", path, num_classes=5)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), convnext_atto.forward_features(images))


def test_convnext_head_dropped_including_head_norm(convnext_atto):
    export = convert(convnext_atto.state_dict(), "convnext_atto", "timm")
    assert set(export.dropped) == {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}


def test_extra_keys_reported_as_unmapped(resnet18):
    state = dict(resnet18.state_dict())
    state["decoder.proj.weight"] = torch.zeros(3)
    state["mask_tokens.0"] = torch.zeros(1)
    export = convert(state, "resnet18", "timm")
    assert sorted(export.unmapped) == ["decoder.proj.weight", "mask_tokens.0"]
    assert "decoder.proj.weight" in export.report() and "fc.weight" in export.report()


def test_missing_and_mismatched_tensors_are_clear_errors(resnet18):
    state = dict(resnet18.state_dict())
    del state["layer4.1.conv2.weight"]
    with pytest.raises(ValueError, match=r"lack 1 tensors.*layer4\.1\.conv2\.weight"):
        convert(state, "resnet18", "timm")
    with pytest.raises(ValueError, match="has shape"):
        convert(resnet18.state_dict(), "resnet50", "timm")


def test_unknown_format_and_architecture(resnet18):
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        convert(resnet18.state_dict(), "resnet18", "onnx")
    with pytest.raises(UnsupportedArchitectureError, match="not a timm model"):
        convert(resnet18.state_dict(), "my_custom_net", "timm")
    assert set(FORMATS) == {"timm", "safetensors", "torchvision", "detectron2", "mmdet", "spark"}


def test_pretrained_tag_in_name_is_accepted(resnet18):
    export = convert(resnet18.state_dict(), "resnet18.a1_in1k", "torchvision")
    assert "conv1.weight" in export.state_dict
