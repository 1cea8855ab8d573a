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
