"""``sparkme-bench``: throughput and memory of the sparse, masked-dense and dense paths, side by side.

Examples::

    sparkme-bench bench=smoke                       # seconds, CI
    sparkme-bench bench=cpu output_dir=docs/bench   # the documented CPU run
    sparkme-bench models=[resnet50] mask_ratios=[0.4,0.6,0.75,0.9] iters=5

Writes results.json, results.csv, results.md and results.png into ``output_dir`` (default: the
Hydra run directory, bench_results/<date>). Configuration: conf/bench.yaml; the suite itself is
:mod:`sparkme.benchmarks.suite`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sparkme.benchmarks.suite import run_benchmark
from sparkme.cli.errors import USER_ERRORS, report_error

__all__ = ["main"]


@hydra.main(version_base="1.3", config_path="pkg://sparkme.conf", config_name="bench")
def _hydra_main(cfg: DictConfig) -> None:
    warnings.filterwarnings("ignore", module="MinkowskiEngine")
    if cfg.output_dir:
        out_dir = Path(cfg.output_dir)
    else:
        out_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    try:
        run_benchmark(cfg, out_dir)
    except USER_ERRORS as error:  # a bad setting: one line on stderr and in the run's log
        report_error("sparkme-bench", error, log_files=True)
        raise SystemExit(2) from None


def main() -> None:
    """Console entry point (``sparkme-bench``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
