"""Run ``sparkme-pretrain`` (the real CLI and configs) for subprocess tests.

With ``SPARKME_TEST_STANDIN=1`` the model is the tiny stand-in instead of the configured one.

Each rank also saves its final weights to ``$SPARKME_TEST_DUMP/rank<r>.pt`` when that is set,
so a test can check that DDP kept the ranks identical.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _standin import StandInSpark  # noqa: E402

import sparkme.training.trainer as trainer_module  # noqa: E402

if os.environ.get("SPARKME_TEST_STANDIN") == "1":
    trainer_module.build_spark = lambda *args, **kwargs: StandInSpark()
_fit = trainer_module.Trainer.fit


def _fit_and_dump(self):  # noqa: ANN001, ANN202
    result = _fit(self)
    dump = os.environ.get("SPARKME_TEST_DUMP")
    if dump:
        torch.save({k: v.detach().clone() for k, v in self.model.named_parameters()}, f"{dump}/rank{self.dist.rank}.pt")
    return result


trainer_module.Trainer.fit = _fit_and_dump

from sparkme.cli.pretrain import main  # noqa: E402

main()
