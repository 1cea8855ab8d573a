"""The benchmark suite as a library: the cases a config names, run in rounds, written as a report.

``sparkme-bench`` (:mod:`sparkme.cli.bench`) is the Hydra command line over :func:`run_benchmark`;
it writes results.json, results.csv, results.md and results.png. Configuration: conf/bench.yaml.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sparkme.benchmarks.machine import describe_machine, machine_line
from sparkme.benchmarks.measure import Case, check_measure, run_case
from sparkme.benchmarks.paths import default_paths, get_path
from sparkme.benchmarks.report import add_ratios, markdown_table, write_report
from sparkme.benchmarks.rounds import merge_rounds
from sparkme.benchmarks.worker import failed_row, run_isolated

__all__ = ["cases_from_config", "run_benchmark"]

log = logging.getLogger("sparkme.bench")


def cases_from_config(cfg: DictConfig) -> list[Case]:
    """Every (model, batch, resolution, mask ratio, measure, path) combination, paths innermost."""
    paths = list(cfg.paths) if cfg.paths else default_paths(cfg.device)
    for name in paths:
        get_path(name)  # clear error for a typo before anything runs
    for model, measure, path in itertools.product(cfg.models or [None], cfg.measures, paths):
        check_measure(model, measure, path)  # unknown measures; the 2D-only step baseline on volumes
    if not cfg.models:
        raise ValueError("models is empty; give at least one timm model name, e.g. models=[resnet50]")
    combos = itertools.product(cfg.models, cfg.batch_sizes, cfg.resolutions, cfg.mask_ratios, cfg.measures, paths)
    return [
        Case(
            model=model,
            path=path,
            measure=measure,
            batch=int(batch),
            resolution=int(resolution),
            mask_ratio=float(ratio),
            device=cfg.device,
            warmup=int(cfg.warmup),
            iters=int(cfg.iters),
            seed=int(cfg.seed),
            decoder_width=int(cfg.decoder_width),
            threads=cfg.threads,
        )
        for model, batch, resolution, ratio, measure, path in combos
    ]


def _run_in_process(case: Case) -> dict:

    try:
        row = run_case(case)
        if not row["memory_method"].startswith("cuda"):  # CUDA's peak is reset per case: comparable in-process
            row["memory_method"] += (
                " (in-process run, isolate=false: memory freed by earlier cases is reused, not comparable)"
            )
        return row
    except Exception as err:  # one failing path must not hide the others' numbers
        log.exception("case failed: %s", case)
        return failed_row(case, repr(err))


def run_benchmark(cfg: DictConfig, out_dir: Path) -> list[dict]:
    """Run every case of ``cfg`` and write the report into ``out_dir``; return the result rows."""

    cases = cases_from_config(cfg)
    rounds = int(cfg.get("rounds", 1))
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    machine = describe_machine(cfg.device)
    log.info("%d cases x %d round(s) on %s", len(cases), rounds, machine_line(machine))
    per_round = []
    for round_index in range(1, rounds + 1):
        rows = []
        for index, case in enumerate(cases, 1):
            row = run_isolated(case, cfg.case_timeout_s) if cfg.isolate else _run_in_process(case)
            rows.append(row)
            status = f"{row['ms']:.1f} ms, peak {row['peak_mib']:.0f} MiB" if row["error"] is None else row["error"]
            log.info("round %d/%d [%d/%d] %s %s %s b%d %dpx mask %.2f: %s", round_index, rounds, index, len(cases),
                     case.model, case.measure, case.path, case.batch, case.resolution, case.mask_ratio,
                     status)  # fmt: skip
        per_round.append(add_ratios(rows, cfg.reference))
    rows = merge_rounds(per_round) if rounds > 1 else per_round[0]
    config = OmegaConf.to_container(cfg, resolve=True)
    files = write_report(rows, machine, config, out_dir, plot=cfg.plot)
    print(markdown_table(rows, machine))
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return rows
