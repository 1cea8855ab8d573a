"""Run one benchmark case in a fresh process: ``python -m sparkme.benchmarks.worker CASE.json RESULT.json``.

A fresh process per case makes the CPU peak-RSS figure honest (nothing freed earlier is
counted or reused) and keeps one path's crash or out-of-memory from ending the whole run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

from sparkme.benchmarks.measure import Case

__all__ = ["run_isolated", "main"]


def run_isolated(case: Case, timeout_s: float) -> dict:
    """``run_case`` in a child process; a failure becomes a row with ``error`` set."""
    env = dict(os.environ)
    if case.threads:
        env["OMP_NUM_THREADS"] = str(case.threads)
    with tempfile.TemporaryDirectory(prefix="sparkme-bench-") as tmp:
        case_file, result_file = Path(tmp) / "case.json", Path(tmp) / "result.json"
        case_file.write_text(json.dumps(asdict(case)))
        command = [sys.executable, "-m", "sparkme.benchmarks.worker", str(case_file), str(result_file)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return failed_row(case, f"timed out after {timeout_s:.0f} s")
        if done.returncode == 0 and result_file.exists():
            return json.loads(result_file.read_text())
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return failed_row(case, f"exit code {done.returncode}: {' | '.join(tail)}")


def failed_row(case: Case, message: str) -> dict:
    """The result row of a case that produced no measurement."""
    return {
        **asdict(case),
        "ms": None,
        "ms_all": [],
        "cpu_ms": None,
        "images_per_s": None,
        "peak_mib": None,
        "error": message,
    }


def main(argv: list[str] | None = None) -> int:
    from sparkme.benchmarks.measure import run_case

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m sparkme.benchmarks.worker CASE.json RESULT.json", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", module="MinkowskiEngine")
    case = Case(**json.loads(Path(args[0]).read_text()))
    Path(args[1]).write_text(json.dumps(run_case(case)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
