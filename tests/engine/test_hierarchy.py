"""Stages, channels and strides: timm feature_info (plain and features_only), user stages, probing."""

from __future__ import annotations

import pytest
import timm
import torch
from engine_reference import USER_STAGES, assert_rel, make_model, random_visible

import sparkme


def test_timm_metadata():
    encoder = sparkme.sparsify(make_model("resnet18"))
    assert encoder.feature_channels == [64, 128, 256, 512]
    assert encoder.feature_strides == [4, 8, 16, 32]
    assert encoder.downsample_ratio == 32
    assert (encoder.norm_kind, encoder.model_name) == ("bn", "resnet18")
    convnext = sparkme.sparsify(make_model("convnext_atto"))
    assert convnext.feature_channels == [40, 80, 160, 320]
    assert (convnext.norm_kind, convnext.model_name) == ("ln", "convnext_atto")


def test_features_only_model_matches_plain_model():
    plain = make_model("resnet18").double().eval()
    features_only = timm.create_model("resnet18", pretrained=False, features_only=True).double()
    features_only.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("fc.")})
    a, b = sparkme.sparsify(plain), sparkme.sparsify(features_only.eval())
    assert b.feature_strides == [4, 8, 16, 32]
    images, visible = torch.randn(2, 3, 64, 64, dtype=torch.float64), random_visible(2, (2, 2), 0.5)
    for x, y in zip(a(images, visible), b(images, visible)):
        assert_rel(y, x, 1e-10)


def test_features_only_out_indices():
    model = timm.create_model("convnext_atto", pretrained=False, features_only=True, out_indices=(1, 2, 3))
    encoder = sparkme.sparsify(model)
    assert encoder.feature_strides == [8, 16, 32]
    assert [f.shape[1] for f in encoder(torch.randn(1, 3, 64, 64), torch.ones(1, 1, 2, 2, dtype=torch.bool))] == [
        80,
        160,
        320,
    ]


def test_user_cnn_stages_given_and_probed():
    given = sparkme.sparsify(make_model("user_cnn"), stages=USER_STAGES)
    assert (given.feature_strides, given.feature_channels, given.downsample_ratio) == ([2, 4, 8], [24, 32, 48], 8)
    assert given.model_name is None and given.norm_kind == "bn"
    probed = sparkme.sparsify(make_model("user_cnn"))
    assert [s.name for s in probed.stages] == ["stage2", "stage3"]
    assert probed.feature_strides == [4, 8]


def test_unknown_stage_and_backend_are_clear_errors():
    with pytest.raises(ValueError, match="stage module 'nope' not found"):
        sparkme.sparsify(make_model("user_cnn"), stages=["nope"])
    with pytest.raises(ValueError, match="unknown sparse backend"):
        sparkme.sparsify(make_model("user_cnn"), backend="nope")


class FixedSizeHead(torch.nn.Module):
    """A classic CNN whose classifier only fits 32x32 inputs: the 256x256 probe fails in the head."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.features = torch.nn.Sequential(
            conv(3, 8, 3, 2, 1), torch.nn.ReLU(), conv(8, 8, 3, 2, 1), torch.nn.ReLU(), conv(8, 8, 3, 2, 1)
        )
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def test_probe_survives_a_head_for_another_size():
    encoder = sparkme.sparsify(FixedSizeHead())
    assert [s.name for s in encoder.stages] == ["features.3", "features"]  # the ReLU ends stride 4
    assert encoder.feature_strides == [4, 8]
    given = sparkme.sparsify(FixedSizeHead(), stages=["features.2", "features.4"])
    assert given.feature_strides == [4, 8]
    assert [f.shape for f in given(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 4, 4, dtype=torch.bool))] == [
        (1, 8, 8, 8),
        (1, 8, 4, 4),
    ]
