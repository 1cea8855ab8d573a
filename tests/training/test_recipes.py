"""Every experiment= recipe is the official SparK recipe for its model, written as a delta over one base.

Official values: ``pretrain/utils/arg_util.py`` (batch 4096, base lr 2e-4, wd 0.04 -> 0.2, 1600
epochs, 40 warmup epochs, clip 5, LAMB, beta2 0.95 for ResNets and 0.999 for ConvNeXts, SyncBN on,
mask 0.6, 224 px), ``models/__init__.py`` (drop path per model), ``utils/lr_control.py``
(warmup from 0.005x, cosine to 0.001x the peak lr) and ``decoder.py`` (width 768).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from _helpers import compose

EXPERIMENTS = Path(__file__).resolve().parents[2] / "conf" / "experiment"

OFFICIAL = {  # experiment: (timm model, drop path, LAMB beta2, epochs)
    "spark_resnet50": ("resnet50", 0.05, 0.95, 1600),
    "spark_resnet50_800ep": ("resnet50", 0.05, 0.95, 800),
    "spark_resnet101": ("resnet101", 0.08, 0.95, 1600),
    "spark_resnet152": ("resnet152", 0.10, 0.95, 1600),
    "spark_resnet200": ("resnet200", 0.15, 0.95, 1600),
    "spark_convnext_small": ("convnext_small", 0.2, 0.999, 1600),
    "spark_convnext_small_800ep": ("convnext_small", 0.2, 0.999, 800),
    "spark_convnext_base": ("convnext_base", 0.3, 0.999, 1600),
    "spark_convnext_large": ("convnext_large", 0.4, 0.999, 1600),
}


DEMOS = {"spark3d_demo"}  # starting points that are not paper recipes (no official 3D SparK exists)


def test_every_recipe_is_listed() -> None:
    assert sorted(path.stem for path in EXPERIMENTS.glob("*.yaml")) == sorted([*OFFICIAL, *DEMOS])


def test_the_3d_demo_keeps_the_method_defaults() -> None:
    """The volume demo changes model, data, width, lr and length for a CPU minute, never the method."""
    cfg = compose(["experiment=spark3d_demo"])
    assert cfg.model._target_ == "sparkme.models.resnet3d.ResNet3d" and cfg.data.volume_size == 32
    assert (cfg.spark.mask_ratio, cfg.spark.norm_pix_loss) == (0.6, True)
    assert cfg.optim.optimizer._target_ == "timm.optim.Lamb"


@pytest.mark.parametrize("experiment", sorted(OFFICIAL))
def test_recipe_equals_the_official_one(experiment: str) -> None:
    model_name, drop_path, beta2, epochs = OFFICIAL[experiment]
    cfg = compose([f"experiment={experiment}", "data.root=/imagenet/train"])
    assert (cfg.model.model_name, cfg.model.drop_path_rate, cfg.model.pretrained) == (model_name, drop_path, False)
    assert list(cfg.optim.optimizer.betas) == [0.9, beta2] and cfg.optim.optimizer._target_ == "timm.optim.Lamb"
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad) == (
        2e-4,
        0.04,
        0.2,
        5.0,
    )
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.sync_bn) == (epochs, 4096, True)
    assert (cfg.schedule.warmup_epochs, cfg.schedule.warmup_start_ratio, cfg.schedule.min_lr_ratio) == (
        40,
        0.005,
        0.001,
    )
    assert (cfg.spark.mask_ratio, cfg.spark.decoder_width, cfg.spark.norm_pix_loss) == (0.6, 768, True)
    assert (cfg.data.image_size, cfg.data.dataset._target_) == (
        224,
        compose(["data=imagefolder"]).data.dataset._target_,
    )


@pytest.mark.parametrize("experiment", sorted(OFFICIAL))
def test_recipe_states_only_its_delta(experiment: str) -> None:
    """Shared settings live in recipe/spark_imagenet.yaml; a recipe adds its model, drop path, beta2, epochs."""
    recipe = yaml.safe_load((EXPERIMENTS / f"{experiment}.yaml").read_text())
    assert set(recipe) <= {"defaults", "model", "optim", "train"}
    assert set(recipe.get("model", {})) <= {"drop_path_rate"}
    assert recipe.get("optim", {}) in ({}, {"optimizer": {"betas": [0.9, 0.999]}})
    assert set(recipe.get("train", {})) <= {"epochs"}
