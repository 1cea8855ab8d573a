"""The interleaved A/B script runs every variant, the official step included, and times each round."""

from __future__ import annotations

import pytest

from sparkme.benchmarks.levers import main


@pytest.mark.parametrize("measure", ["step", "encoder"])
def test_every_variant_is_timed_each_round(measure: str, capsys: pytest.CaptureFixture) -> None:
    variants = ["default", "dense-densify", "nchw", "unblocked", "official"]
    argv = ["--model", "resnet18", "--batch", "2", "--resolution", "64", "--decoder-width", "32", "--rounds", "2"]
    times = main([*argv, "--measure", measure, "--variants", *variants])
    assert list(times) == variants and all(len(v) == 2 and min(v) > 0 for v in times.values())
    table = capsys.readouterr().out
    assert f"resnet18 {measure}" in table and "| official |" in table and "| default | " in table


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown variants"):
        main(["--variants", "default", "fastest"])


def test_memory_is_measured_per_variant_in_a_fresh_process(capsys: pytest.CaptureFixture) -> None:
    argv = ["--model", "resnet18", "--batch", "2", "--resolution", "64", "--decoder-width", "32", "--rounds", "1"]
    main([*argv, "--measure", "encoder", "--variants", "default", "unblocked", "--memory"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| default |")]
    assert len(rows) == 1 and rows[0].endswith("(1.00x) |")
