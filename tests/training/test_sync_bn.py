"""SyncBatchNorm under DDP: two gloo ranks on CPU equal one process on the concatenated batch.

Everything is float64, so the only difference between the two runs is the order of summation;
a missing or wrong synchronisation (local statistics, a mean of per-rank means, a biased
variance, a lost gradient term) changes results in the first digits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _sync_bn_worker import PATCH, SHARDS, SIZE, TinyCNN, batch, build, shard
from torch import nn

from sparkme.engine.layers.sync_bn import SparseSyncBatchNorm, convert_sync_batchnorms
from sparkme.method.masking import upsample_mask

HERE = Path(__file__).resolve().parent
TOL = 1e-9  # float64: summation-order differences are ~1e-15 relative


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sync_bn")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(SHARDS)}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, str(HERE / "_sync_bn_worker.py"), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(len(SHARDS))]


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, plain BatchNorms, the whole batch."""
    model = build(sync_bn=False)
    images, mask, probe = batch()
    images.requires_grad_(True)
    _, pred, _ = model(images, mask=mask)
    (pred * probe).sum().backward()
    return {
        "pred": pred.detach(),
        "images_grad": images.grad,
        "grads": {k: p.grad for k, p in model.named_parameters() if p.grad is not None},
        "buffers": dict(model.named_buffers()),
        "batch_norms": sorted(k for k, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)),
    }


def test_every_batchnorm_is_synchronised(ranks: list[dict], reference: dict) -> None:
    names = reference["batch_norms"]
    assert any(n.startswith("encoder.") for n in names)
    assert any(n.startswith("densify.") for n in names) and any(n.startswith("decoder.") for n in names)
    assert all(r["sync_bn"] == names for r in ranks)


def test_outputs_and_input_grads_equal_one_process(ranks: list[dict], reference: dict) -> None:
    for rank, result in enumerate(ranks):
        pred, images_grad = shard(rank, reference["pred"], reference["images_grad"])
        assert _rel(result["pred"], pred) < TOL
        assert _rel(result["images_grad"], images_grad) < TOL


def test_parameter_grads_equal_one_process(ranks: list[dict], reference: dict) -> None:
    """DDP averages the per-rank grads; the single-process objective is their sum."""
    expected = reference["grads"]
    assert ranks[0]["trainable"] == sorted(expected)  # the head is frozen, nothing else
    for result in ranks:
        assert sorted(result["grads"]) == sorted(expected)
        for key, grad in result["grads"].items():
            scale = max(g.abs().max() for g in expected.values())  # grads that are zero up to rounding
            assert float((grad * len(SHARDS) - expected[key]).abs().max()) < TOL * max(
                float(expected[key].abs().max()), 1e-6 * float(scale)
            ), key


def test_running_statistics_equal_one_process(ranks: list[dict], reference: dict) -> None:
    for result in ranks:
        for key, value in reference["buffers"].items():
            if value.is_floating_point():
                assert _rel(result["buffers"][key], value) < TOL, key
            else:
                assert torch.equal(result["buffers"][key], value), key


def test_statistics_cover_the_visible_sites_of_all_ranks(ranks: list[dict]) -> None:
    """Ground truth without any BatchNorm module: the stem's 1x1 conv at the visible pixels of all samples."""
    dense = build(sync_bn=False).encoder.model
    images, mask, _ = batch()
    visible = ~upsample_mask(mask, PATCH)
    with torch.no_grad():
        values = dense.stem[0](images).permute(0, 2, 3, 1)[visible]  # [visible pixels of every rank, C]
    momentum = dense.stem[1].momentum
    mean = momentum * values.mean(0)
    var = (1 - momentum) + momentum * values.var(0, unbiased=True)
    for result in ranks:
        assert _rel(result["buffers"]["encoder.model.stem.1.running_mean"], mean) < TOL
        assert _rel(result["buffers"]["encoder.model.stem.1.running_var"], var) < TOL
    assert values.shape[0] == sum(SHARDS) * SIZE * SIZE // 2  # half the patches visible


def test_conversion_keeps_weights_and_names() -> None:
    torch.manual_seed(0)
    dense = TinyCNN()
    with torch.no_grad():
        dense.stem[1].running_mean.uniform_()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    converted = convert_sync_batchnorms(dense)
    assert isinstance(converted.stem[1], SparseSyncBatchNorm)
    after = converted.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_single_process_falls_back_to_plain_batchnorm() -> None:
    """No process group: the synchronised model computes exactly what the plain one does."""
    images, mask, _ = batch()
    _, synced, _ = build(sync_bn=True)(images, mask=mask)
    _, plain, _ = build(sync_bn=False)(images, mask=mask)
    assert torch.equal(synced, plain)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    """What DDP with ``find_unused_parameters=False`` needs: the never-run head is frozen, nothing else."""
    from sparkme.training.build import build_spark

    torch.manual_seed(0)
    model = build_spark({"_target_": "timm.create_model", "model_name": name}, {"decoder_width": 32}, sync_bn=True)
    loss, _, _ = model(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    loss.backward()
    frozen = sorted(k for k, p in model.named_parameters() if not p.requires_grad)
    assert frozen and all(k.startswith(("encoder.model.fc.", "encoder.model.head.")) for k in frozen), frozen
    assert [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert not any(type(m) is nn.BatchNorm2d or type(m) is nn.BatchNorm1d for m in model.modules())
    head = "fc.weight" if name == "resnet18" else "head.norm.weight"
    assert head in model.encoder.dense_state_dict()  # the dense model's keys, head included


@pytest.mark.slow
def test_cli_with_sync_bn_under_torchrun(tmp_path: Path) -> None:
    """``sparkme-pretrain train.sync_bn=true`` on 2 gloo ranks (CPU), a real sparse ResNet-10, DDP without
    an unused-parameter search."""
    from _helpers import TINY

    from sparkme.training.checkpoint import load_checkpoint

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["model=custom", "data.image_size=64", "train.epochs=1", "reconstruction.every_epochs=0"]
    args += ["train.sync_bn=true", "train.find_unused_parameters=false", "logger.progress_bar=false"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "SPARKME_TEST_DUMP": str(tmp_path)}
    done = subprocess.run(
        [*launcher, str(HERE / "_launch_cli.py"), *TINY, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    (run,) = (tmp_path / "outputs" / "pretrain").iterdir()
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pth")
    assert checkpoint["step"] == 3  # 12 images / global batch 4
    assert int(checkpoint["model"]["encoder.model.bn1.num_batches_tracked"]) == 3
    assert "world size 2" in (run / "pretrain.log").read_text()
