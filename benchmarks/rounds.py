"""Repeated rounds of a benchmark run, merged: the answer to a machine whose speed drifts.

On a shared machine the speed changes over minutes, so two paths timed minutes apart can differ
by 20-40% for reasons that have nothing to do with them. With ``rounds: N`` the whole list of cases
runs N times, one path after the other each round; each round's ratios compare cases that ran
seconds apart, and the report gives, per case, the median over rounds of its time and memory and
the median of its per-round ratios (``ms_rounds`` / ``time_vs_ref_rounds`` keep every value).
"""

from __future__ import annotations

import statistics

__all__ = ["merge_rounds"]

_RATIO_FIELDS = ("time_vs_ref", "cpu_vs_ref", "mem_vs_ref", "time_vs_best_masked", "mem_vs_best_masked")
_VALUE_FIELDS = ("ms", "cpu_ms", "peak_mib")  # images/s is derived from the merged ms


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per case from ``rounds`` (lists of rows in the same case order, ratios already added).

    A case that failed in any round is reported as failed (with that round's error): a path that
    only works sometimes must not look like a clean number.
    """
    if not rounds:
        return []
    if len({len(rows) for rows in rounds}) != 1:
        raise ValueError(f"rounds have different numbers of cases: {[len(rows) for rows in rounds]}")
    merged = []
    for per_round in zip(*rounds, strict=True):
        row = dict(per_round[0])
        errors = [r["error"] for r in per_round if r["error"] is not None]
        row["rounds"] = len(per_round)
        row["ms_rounds"] = [r["ms"] for r in per_round]
        row["time_vs_ref_rounds"] = [r.get("time_vs_ref") for r in per_round]
        if errors:
            row["error"] = errors[0]
            for field in (*_VALUE_FIELDS, *_RATIO_FIELDS, "images_per_s"):
                row[field] = None
        else:
            for field in (*_VALUE_FIELDS, *_RATIO_FIELDS):
                row[field] = _median([r.get(field) for r in per_round])
            row["images_per_s"] = row["batch"] / (row["ms"] / 1000)
        merged.append(row)
    return merged
