"""sparkme-bench: the smoke run end to end, the isolated worker, the masked-dense baseline's semantics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_module

import sparkme
from sparkme.benchmarks.masked_dense import MaskedDenseEncoder, UnsupportedForMaskedDense
from sparkme.benchmarks.measure import Case
from sparkme.benchmarks.paths import dense_backbone
from sparkme.benchmarks.suite import cases_from_config, run_benchmark
from sparkme.benchmarks.worker import run_isolated


def _config(*overrides: str):
    with initialize_config_module(config_module="sparkme.conf", version_base="1.3"):
        return compose("bench", overrides=["bench=smoke", *overrides])


def test_smoke_run_writes_json_csv_markdown_and_plot(tmp_path: Path) -> None:
    cfg = _config("models=[resnet18]", "paths=[sparse-gather,masked-dense]")
    rows = run_benchmark(cfg, tmp_path)
    assert len(rows) == 4  # 2 measures x 2 paths
    assert all(row["error"] is None and row["ms"] > 0 for row in rows), [row["error"] for row in rows]
    for row in rows:
        if row["path"] == "masked-dense":
            assert row["time_vs_ref"] == pytest.approx(1.0)
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["ms"] / 1000))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["cpu"] and saved["machine"]["torch"] == torch.__version__
    assert len(saved["results"]) == 4
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,measure,batch") and len(csv_lines) == 5
    table = (tmp_path / "results.md").read_text()
    assert "| resnet18 | step | 2 | 64 | 0.6 | sparse-gather |" in table and "Machine:" in table
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_bf16_paths_run_the_whole_step(tmp_path: Path) -> None:
    """The GPU's bf16 paths, sparse included, run end to end (on the CPU here: plumbing, not speed)."""
    cfg = _config("models=[resnet18]", "paths=[sparse-gather-bf16,masked-dense-bf16-cl]", "plot=false")
    rows = run_benchmark(cfg, tmp_path)
    assert len(rows) == 4 and all(row["error"] is None and row["ms"] > 0 for row in rows), rows


def test_isolated_case_runs_in_a_fresh_process() -> None:
    case = Case(model="resnet18", path="dense", measure="encoder", batch=1, resolution=64, mask_ratio=0.6, iters=1)
    row = run_isolated(case, timeout_s=300)
    assert row["error"] is None, row["error"]
    assert row["ms"] > 0 and row["peak_mib"] > 0 and "VmHWM" in row["memory_method"]


@pytest.mark.slow
def test_isolated_failure_becomes_an_error_row() -> None:
    case = Case(model="resnet18", path="dense", measure="encoder", batch=1, resolution=48, mask_ratio=0.6, iters=1)
    row = run_isolated(case, timeout_s=300)
    assert row["ms"] is None and "not a multiple" in row["error"]


def test_bad_config_is_refused_before_running() -> None:
    with pytest.raises(ValueError, match="unknown benchmark path 'sparse-fast'"):
        cases_from_config(_config("paths=[sparse-fast]"))
    with pytest.raises(ValueError, match="unknown measure 'epoch'"):
        cases_from_config(_config("measures=[epoch]"))


def test_default_config_covers_both_models_four_ratios_and_every_path() -> None:
    with initialize_config_module(config_module="sparkme.conf", version_base="1.3"):
        cfg = compose("bench")
    cases = cases_from_config(cfg)
    assert {c.model for c in cases} == {"resnet50", "convnext_small"}
    assert {c.mask_ratio for c in cases} == {0.4, 0.6, 0.75, 0.9}
    assert {c.path for c in cases} == {"sparse-gather", "sparse-minkowski", "masked-dense", "dense"}


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_masked_dense_baseline_computes_what_the_sparse_engine_computes(name: str) -> None:
    """The baseline is only fair if it does the same math: compare features in float64, train mode."""
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False).double()
    encoder = sparkme.sparsify(dense, backend="gather").train()
    backbone = dense_backbone(name).double()
    # timm's features_only wrapper flattens the top level ("stages.0" -> "stages_0")
    source = dense.state_dict()
    backbone.load_state_dict(
        {key: source[re.sub(r"^([a-z]+)_(\d+)\.", r"\1.\2.", key)] for key in backbone.state_dict()}
    )
    baseline = MaskedDenseEncoder(backbone, name).train()
    assert baseline.feature_strides == encoder.feature_strides
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    visible = torch.tensor(
        [[[[True, False, True], [False, True, True]]], [[[False, False, True], [True, False, False]]]]
    )
    for sparse_map, masked in zip(encoder(images, visible), baseline(images, visible)):
        torch.testing.assert_close(sparse_map, masked, rtol=1e-9, atol=1e-9)


def test_masked_dense_refuses_layers_it_cannot_emulate() -> None:
    with pytest.raises(UnsupportedForMaskedDense, match="SEModule"):
        MaskedDenseEncoder(dense_backbone("seresnet18"), "seresnet18")


@pytest.mark.slow
def test_console_script_runs(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("sparkme-bench")
    command = [str(script), "bench=smoke", "models=[resnet18]", "paths=[dense]", "measures=[encoder]"]
    done = subprocess.run(
        [*command, f"output_dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )  # cwd: Hydra's own run directory (bench_results/...) must not land in the checkout
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| resnet18 | encoder | 2 | 64 | 0.6 | dense |" in (tmp_path / "results.md").read_text()


def test_console_script_reports_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("sparkme-bench")
    done = subprocess.run(
        [str(script), "bench=smoke", "paths=[sparse-fast]", f"output_dir={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparkme-bench: error: unknown benchmark path 'sparse-fast'"), lines


def test_rounds_pair_paths_in_time_and_report_medians(tmp_path: Path) -> None:
    cfg = _config("models=[resnet18]", "paths=[dense,masked-dense]", "measures=[encoder]", "rounds=3", "plot=false")
    rows = run_benchmark(cfg, tmp_path)
    assert len(rows) == 2 and all(row["rounds"] == 3 and len(row["ms_rounds"]) == 3 for row in rows)
    dense = next(row for row in rows if row["path"] == "dense")
    assert dense["ms"] == sorted(dense["ms_rounds"])[1]
    assert dense["time_vs_ref"] == sorted(dense["time_vs_ref_rounds"])[1]
    assert dense["images_per_s"] == pytest.approx(dense["batch"] / (dense["ms"] / 1000))
    assert "Rounds: 3" in (tmp_path / "results.md").read_text()


def test_a_case_failing_in_one_round_is_reported_failed() -> None:
    from sparkme.benchmarks.rounds import merge_rounds

    ok = {"path": "dense", "batch": 2, "error": None, "ms": 10.0, "cpu_ms": 20.0, "images_per_s": 1.0, "peak_mib": 5.0}
    rows = merge_rounds([[dict(ok)], [dict(ok, error="boom", ms=None)], [dict(ok, ms=30.0)]])
    assert rows[0]["error"] == "boom" and rows[0]["ms"] is None and rows[0]["ms_rounds"] == [10.0, None, 30.0]
    with pytest.raises(ValueError, match="different numbers of cases"):
        merge_rounds([[ok], [ok, ok]])
