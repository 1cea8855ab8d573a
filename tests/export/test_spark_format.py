"""Official SparK checkpoints both ways: ``init_from=`` reads them, ``--format spark`` writes them.

The official-layout state dict is built here from the key names and shapes of official SparK
(``pretrain/spark.py``, ``decoder.py``, ``encoder.py``, ``models/__init__.py``), not from the
converter, and must come back bitwise after init_from -> export.
"""

from __future__ import annotations

import pytest
import torch

import sparkme
from sparkme.converters.spark_format import convnext_official_to_timm, convnext_timm_to_official, to_spark
from sparkme.training.init_weights import init_from

WIDTH = 64  # decoder width of the test model (official: 768); levels 64, 32, 16, 8, 4, 2
IMAGE = 64


def _random_like(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if value.is_floating_point():
        return torch.randn(value.shape, generator=generator)
    return torch.randint(0, 1000, value.shape, generator=generator, dtype=value.dtype)


def official_resnet18_checkpoint(seed: int = 0) -> dict:
    """``main.py``'s "withdecoder" file for resnet18 with a 64-wide decoder, every tensor random."""
    import timm

    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        cnn = timm.create_model("resnet18", num_classes=0, global_pool="")  # as models/__init__.py builds it
    module = {f"sparse_encoder.sp_cnn.{k}": _random_like(v, generator) for k, v in cnn.state_dict().items()}
    widths = [WIDTH // 2**i for i in range(6)]
    for i in range(5):  # decoder.py: dec[i] = UNetBlock(widths[i], widths[i + 1]); proj = 1x1 conv to 3
        shapes = {
            "up_sample.weight": (widths[i], widths[i], 4, 4),
            "up_sample.bias": (widths[i],),
            "conv.0.weight": (widths[i], widths[i], 3, 3),
            "conv.3.weight": (widths[i + 1], widths[i], 3, 3),
        }
        for bn, channels in (("conv.1", widths[i]), ("conv.4", widths[i + 1])):
            shapes.update({f"{bn}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")})
        for name, shape in shapes.items():
            module[f"dense_decoder.dec.{i}.{name}"] = torch.randn(shape, generator=generator)
        for bn in ("conv.1", "conv.4"):
            module[f"dense_decoder.dec.{i}.{bn}.num_batches_tracked"] = torch.tensor(5 + i)
    module["dense_decoder.proj.weight"] = torch.randn(3, widths[5], 1, 1, generator=generator)
    module["dense_decoder.proj.bias"] = torch.randn(3, generator=generator)
    for i, channels in enumerate([512, 256, 128, 64]):  # spark.py: deepest scale first
        for name in ("weight", "bias", "running_mean", "running_var"):
            module[f"densify_norms.{i}.{name}"] = torch.randn(channels, generator=generator)
        module[f"densify_norms.{i}.num_batches_tracked"] = torch.tensor(9)
        kernel = 1 if i == 0 else 3
        module[f"densify_projs.{i}.weight"] = torch.randn(widths[i], channels, kernel, kernel, generator=generator)
        module[f"densify_projs.{i}.bias"] = torch.randn(widths[i], generator=generator)
        module[f"mask_tokens.{i}"] = torch.randn(1, channels, 1, 1, generator=generator)
    module["imn_m"], module["imn_s"] = torch.empty(1, 3, 1, 1), torch.empty(1, 3, 1, 1)
    module["norm_black"] = torch.zeros(1, 3, IMAGE, IMAGE)
    module["config"] = {
        "mask_ratio": 0.6,
        "densify_norm_str": "bn",
        "sbn": True,
        "hierarchy": 4,
        "sparse_encoder.input_size": IMAGE,
        "dense_decoder.width": WIDTH,
    }
    return {"args": "", "input_size": IMAGE, "arch": "resnet18", "epoch": 3, "module": module, "is_pretrain": True}


def _spark_resnet18() -> torch.nn.Module:
    import timm

    torch.manual_seed(1)
    return sparkme.SparK(sparkme.sparsify(timm.create_model("resnet18", num_classes=0)), decoder_width=WIDTH)


def test_official_checkpoint_loads_and_exports_back_bitwise(tmp_path):
    official = official_resnet18_checkpoint()
    path = tmp_path / "res18_withdecoder_1kpretrained_spark_style.pth"
    torch.save(official, path)
    model = _spark_resnet18()
    report = init_from(model, path)
    module = official["module"]
    assert report.left_at_init == [] and set(report.skipped) == {"imn_m", "imn_s", "norm_black", "config"}

    # the right tensor in the right place: official scale 0 is sparkme's deepest (last) scale
    assert torch.equal(model.densify.mask_tokens[3], module["mask_tokens.0"].flatten())
    assert torch.equal(model.densify.norms[0].running_var, module["densify_norms.3.running_var"])
    assert torch.equal(model.densify.projections[2].weight, module["densify_projs.1.weight"])
    assert torch.equal(model.decoder.blocks[4].conv[4].bias, module["dense_decoder.dec.4.conv.4.bias"])
    assert torch.equal(model.decoder.head.weight, module["dense_decoder.proj.weight"])
    assert torch.equal(
        model.encoder.model.layer4[1].bn2.running_mean, module["sparse_encoder.sp_cnn.layer4.1.bn2.running_mean"]
    )

    export = to_spark(model.state_dict(), "resnet18", image_size=IMAGE, mask_ratio=0.6, sync_bn=True, epoch=4)
    written = export.payload["module"]
    assert written["config"] == module["config"] and export.payload["epoch"] == 3
    assert set(written) == set(module)
    for key, value in module.items():
        if key == "config":
            continue
        assert written[key].shape == value.shape and written[key].dtype == value.dtype, key
        if key not in ("imn_m", "imn_s"):  # official: torch.empty, never used
            assert torch.equal(written[key], value), key


def test_encoder_only_file_loads_the_encoder_and_keeps_the_rest(tmp_path):
    official = official_resnet18_checkpoint(seed=2)["module"]
    prefix = "sparse_encoder.sp_cnn."
    encoder = {key[len(prefix) :]: value for key, value in official.items() if key.startswith(prefix)}
    path = tmp_path / "resnet18_1kpretrained_timm_style.pth"
    torch.save(encoder, path)
    model = _spark_resnet18()
    decoder_before = model.decoder.head.weight.clone()
    report = init_from(model, path)
    assert report.loaded == len(encoder)
    assert torch.equal(model.encoder.model.conv1.weight, encoder["conv1.weight"])
    assert torch.equal(model.decoder.head.weight, decoder_before)
    export = to_spark(model.encoder.dense_state_dict(), "resnet18")
    assert set(export.payload["module"]) == set(official) - {"config"} - {
        k for k in official if not k.startswith(prefix)
    }


def test_wrong_architecture_is_refused(tmp_path):
    import timm

    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), path)
    with pytest.raises(ValueError, match="match nothing|lacks|shape"):
        init_from(_spark_resnet18(), path)


def test_convnext_keys_are_the_official_layout_that_timm_reads_back():
    """timm's own remap of facebookresearch ConvNeXt checkpoints undoes our timm -> official names."""
    import timm
    from timm.models.convnext import checkpoint_filter_fn

    model = timm.create_model("convnext_tiny", num_classes=0)
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}  # official pretrain: no head
    official = {convnext_timm_to_official(key): value for key, value in trunk.items()}
    assert "downsample_layers.0.0.weight" in official and "stages.3.2.pwconv2.bias" in official
    assert "stages.1.0.gamma" in official and "downsample_layers.2.1.weight" in official
    back = checkpoint_filter_fn(official, model)
    assert back.keys() == trunk.keys() and all(torch.equal(back[k], trunk[k]) for k in trunk)
    assert {convnext_official_to_timm(key) for key in official} == set(trunk)


def test_export_cli_writes_the_spark_format(tmp_path):
    from omegaconf import OmegaConf

    from sparkme.cli.export import main

    model = _spark_resnet18()
    checkpoint = {
        "model": model.state_dict(),
        "encoder": model.encoder.dense_state_dict(),
        "model_name": "resnet18",
        "spark_cfg": {"mask_ratio": 0.6, "decoder_width": WIDTH},
        "config": OmegaConf.to_yaml({"data": {"image_size": IMAGE}, "train": {"sync_bn": False}}),
        "epoch": 2,
    }
    torch.save(checkpoint, tmp_path / "last.pth")
    assert main([str(tmp_path / "last.pth"), "--format", "spark", "--out", str(tmp_path / "spark.pth")]) == 0
    written = torch.load(tmp_path / "spark.pth", weights_only=True)
    assert written["module"]["config"]["sbn"] is False and written["input_size"] == IMAGE
    again = _spark_resnet18()
    init_from(again, tmp_path / "spark.pth")
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_pretrain_config_init_from_loads_before_training(tmp_path):
    """``sparkme-pretrain init_from=PATH``: the Trainer's model starts from the file's weights."""
    from hydra import compose, initialize_config_module

    from sparkme.training.trainer import Trainer

    official = official_resnet18_checkpoint(seed=3)
    torch.save(official, tmp_path / "spark.pth")
    overrides = ["data.image_size=64", "data.dataset.length=8", "train.batch_size=4", "train.device=cpu"]
    overrides += [f"spark.decoder_width={WIDTH}", f"init_from={tmp_path / 'spark.pth'}", "logger=none"]
    with initialize_config_module(config_module="sparkme.conf", version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides)
    model = Trainer(cfg, tmp_path / "run").model
    assert torch.equal(model.densify.mask_tokens[3], official["module"]["mask_tokens.0"].flatten())
    assert torch.equal(model.encoder.model.conv1.weight, official["module"]["sparse_encoder.sp_cnn.conv1.weight"])
