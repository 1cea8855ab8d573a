"""Fixtures for the export tests: small real timm models with non-trivial weights."""

from __future__ import annotations

import pytest
import torch


def randomized_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A timm model with random BatchNorm statistics and affine terms (fresh BN is an identity,
    which would hide a swapped or dropped tensor), in eval mode."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d | torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="session")
def resnet18() -> torch.nn.Module:
    return randomized_model("resnet18")


@pytest.fixture(scope="session")
def resnet50() -> torch.nn.Module:
    return randomized_model("resnet50")


@pytest.fixture(scope="session")
def convnext_atto() -> torch.nn.Module:
    return randomized_model("convnext_atto")


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on the shared, oversubscribed 2-core machine torch's default of 2
    spinning OpenMP threads made a small forward pass ~50x slower (3.6 s vs 0.06 s measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
