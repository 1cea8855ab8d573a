"""Write a benchmark run as JSON, CSV, a markdown table and a PNG plot, with ratios to masked-dense."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sparkme.benchmarks.machine import machine_line

__all__ = ["add_ratios", "write_report", "markdown_table"]

_GROUP = ("model", "measure", "batch", "resolution", "mask_ratio", "device")
_CSV_FIELDS = [
    *_GROUP,
    "path",
    "ms",
    "cpu_ms",
    "images_per_s",
    "peak_mib",
    "time_vs_ref",
    "mem_vs_ref",
    "time_vs_best_masked",
    "mem_vs_best_masked",
    "warmup",
    "iters",
    "rounds",
    "threads",
    "error",
]


def _group(row: dict) -> tuple:
    return tuple(row[key] for key in _GROUP)


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def add_ratios(rows: list[dict], reference: str) -> list[dict]:
    """Add time/memory ratios to ``reference`` and to the fastest masked-dense path of the same group."""
    by_group: dict[tuple, list[dict]] = {}
    for row in rows:
        by_group.setdefault(_group(row), []).append(row)
    for group in by_group.values():
        ref = next((r for r in group if r["path"] == reference and r["ms"] is not None), None)
        masked = [r for r in group if r["path"].startswith("masked-dense") and r["ms"] is not None]
        best = min(masked, key=lambda r: r["ms"]) if masked else None
        for row in group:
            row["reference"] = reference
            row["time_vs_ref"] = _ratio(row["ms"], ref and ref["ms"])
            row["cpu_vs_ref"] = _ratio(row.get("cpu_ms"), ref and ref.get("cpu_ms"))
            row["mem_vs_ref"] = _ratio(row["peak_mib"], ref and ref["peak_mib"])
            row["best_masked"] = best and best["path"]
            row["time_vs_best_masked"] = _ratio(row["ms"], best and best["ms"])
            row["mem_vs_best_masked"] = _ratio(row["peak_mib"], best and best["peak_mib"])
    return rows


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def markdown_table(rows: list[dict], machine: dict) -> str:
    reference = rows[0]["reference"] if rows else "masked-dense"
    lines = [
        f"Machine: {machine_line(machine)}",
        "",
        f"| model | measure | batch | res | mask | path | ms (median) | samples/s | peak MiB | time vs {reference} "
        f"| memory vs {reference} | CPU ms | CPU time vs {reference} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ms = _fmt(row["ms"]) if row["error"] is None else f"failed: {row['error'][:60]}"
        lines.append(
            f"| {row['model']} | {row['measure']} | {row['batch']} | {row['resolution']} | {row['mask_ratio']} "
            f"| {row['path']} | {ms} | {_fmt(row['images_per_s'], 2)} | {_fmt(row['peak_mib'], 0)} "
            f"| {_fmt(row['time_vs_ref'], 2, 'x')} | {_fmt(row['mem_vs_ref'], 2, 'x')} "
            f"| {_fmt(row.get('cpu_ms'))} | {_fmt(row.get('cpu_vs_ref'), 2, 'x')} |"
        )
    iters = sorted({(row["warmup"], row["iters"]) for row in rows})
    memory = sorted({row.get("memory_method") for row in rows if row.get("memory_method")})
    lines += [
        "",
        f"Time: median of the timed iterations after warm-up (warm-up, timed): {iters}; CPU ms: this process's CPU "
        f"time (all threads) over the same iterations. Memory: {'; '.join(memory)}.",
    ]
    rounds = max((row.get("rounds", 1) for row in rows), default=1)
    if rounds > 1:
        lines.append(
            f"Rounds: {rounds} (the whole case list run {rounds} times, paths one after the other); each value is "
            "the median over rounds, each ratio the median of the per-round ratios (paths timed seconds apart)."
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], machine: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["measure"], r["batch"], r["resolution"]) for r in rows})
    paths = list(dict.fromkeys(r["path"] for r in rows))
    ratios = sorted({r["mask_ratio"] for r in rows})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels) + 1, 7), squeeze=False)
    width = 0.8 / max(len(paths), 1)
    for col, (model, measure, batch, resolution) in enumerate(panels):
        for row_index, (key, label) in enumerate((("ms", "ms per iteration"), ("peak_mib", "peak memory (MiB)"))):
            ax = axes[row_index][col]
            for p_index, name in enumerate(paths):
                values = []
                for ratio in ratios:
                    match = [
                        r
                        for r in rows
                        if (r["model"], r["measure"], r["batch"], r["resolution"], r["mask_ratio"], r["path"])
                        == (model, measure, batch, resolution, ratio, name)
                    ]
                    values.append(match[0][key] if match and match[0][key] is not None else 0.0)
                xs = [i + (p_index - (len(paths) - 1) / 2) * width for i in range(len(ratios))]
                bars = ax.bar(xs, values, width, label=name)
                if key == "ms":
                    for bar, ratio in zip(bars, ratios):
                        match = [
                            r
                            for r in rows
                            if (r["model"], r["measure"], r["batch"], r["resolution"], r["mask_ratio"], r["path"])
                            == (model, measure, batch, resolution, ratio, name)
                        ]
                        if match and match[0]["time_vs_ref"] is not None:
                            ax.annotate(
                                f"{match[0]['time_vs_ref']:.2f}x",
                                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center",
                                va="bottom",
                                fontsize=7,
                            )
            ax.set_xticks(range(len(ratios)), [f"mask {r}" for r in ratios])
            ax.set_ylabel(label)
            if row_index == 0:
                ax.set_title(f"{model} {measure}\nbatch {batch}, side {resolution}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sparkme-bench (bar labels: time vs {rows[0]['reference']})\n{machine_line(machine)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], machine: dict, config: dict, out_dir: Path, plot: bool = True) -> dict[str, Path]:
    """Write results.{json,csv,md,png} into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "md": out_dir / "results.md",
    }
    files["json"].write_text(json.dumps({"machine": machine, "config": config, "results": rows}, indent=2) + "\n")
    with files["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    files["md"].write_text(markdown_table(rows, machine))
    if plot and any(row["ms"] is not None for row in rows):
        files["png"] = out_dir / "results.png"
        _plot(rows, machine, files["png"])
    return files
