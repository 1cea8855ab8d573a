"""Helpers for the training tests: the real configs composed with Hydra, tiny overrides."""

from __future__ import annotations

TINY = ["debug=tiny", "data.dataset.length=12"]  # conf/debug/tiny.yaml; 12 demo images: 3 steps an epoch


def compose(overrides: list[str] | None = None):
    """The real ``sparkme-pretrain`` config, composed with Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="sparkme.conf", version_base="1.3"):
        return hydra_compose(config_name="pretrain", overrides=list(overrides or []))


def tiny(*extra: str):
    """The composed config shrunk to TINY plus ``extra`` overrides (demo-only ones dropped for other data)."""
    base = TINY if "data=imagefolder" not in extra else [o for o in TINY if not o.startswith("data.dataset.")]
    return compose([*base, *extra])


def assert_exact_resume(common: list[str], tmp_path) -> None:
    """4 optimizer steps straight == 2 steps, a fresh process state, resume, 2 more (the real model)."""
    import torch

    from sparkme.training.trainer import Trainer

    straight = Trainer(tiny(*common, "train.max_steps=4"), tmp_path / "straight")
    straight.fit()
    Trainer(tiny(*common, "train.max_steps=2"), tmp_path / "resumed").fit()
    torch.manual_seed(999)  # the "killed" process's RNG must not leak into the resumed one
    resumed = Trainer(tiny(*common, "train.max_steps=4"), tmp_path / "resumed")
    assert resumed.step == 2 and resumed.fit().steps == 4
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)
