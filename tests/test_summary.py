"""The summary: measured rows only, one per run_id, mean and sample sd per configuration."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.csvtable import to_frame
from benchmarks.leaderboard import empty_row, read_leaderboard
from benchmarks.schema import SCHEMA
from benchmarks.summary import (
    NATIVE,
    SUMMARY_COLUMNS,
    speedup_points,
    summarize,
    summary_from_csv,
    summary_markdown,
    summary_records,
    summary_text,
)


def row(method: str, seed: int, top1: float, **extra) -> dict:
    """A measured row of a physically pruned method: 1000 -> 600 MACs (40% removed)."""
    return (
        empty_row()
        | {
            "source": "measured",
            "method": method,
            "granularity": "filter",
            "faithfulness": "reconstructed",
            "model": "resnet20",
            "dataset": "cifar10",
            "recipe": "short",
            "seed": seed,
            "macs_dense": 1000,
            "macs": 600,
            "macs_nonzero": 600,
            "macs_reduction_pct": 40.0,
            "top1_dense": 92.0,
            "top1": top1,
            "run_id": f"{method}-{seed}",
        }
        | extra
    )


def frame(*rows: dict) -> pd.DataFrame:
    return to_frame(list(rows), SCHEMA)


def only(summary: pd.DataFrame, method: str) -> pd.Series:
    chosen = summary[summary["method"] == method]
    assert len(chosen) == 1
    return chosen.iloc[0]


def test_mean_and_sample_sd_over_runs() -> None:
    top1, dense = [90.0, 91.0, 93.0], [92.0, 92.5, 93.5]
    rows = [
        row("filter-l1", s, t, top1_dense=d)
        for s, (t, d) in enumerate(zip(top1, dense, strict=True))
    ]
    got = only(summarize(frame(*rows)), "filter-l1")
    delta = [t - d for t, d in zip(top1, dense, strict=True)]
    assert got["n"] == 3
    assert got["top1_mean"] == pytest.approx(statistics.mean(top1))
    assert got["top1_sd"] == pytest.approx(statistics.stdev(top1))  # sample sd, ddof 1
    assert got["delta_mean"] == pytest.approx(statistics.mean(delta))
    assert got["delta_sd"] == pytest.approx(statistics.stdev(delta))
    assert got["macs_removed_pct_mean"] == pytest.approx(40.0)
    assert not got["masked"]
    assert got["theory_speedup"] == pytest.approx(1000 / 600)
    assert (got["target"], got["granularity"], got["faithfulness"]) == (
        NATIVE,
        "filter",
        "reconstructed",
    )


def test_single_run_has_no_sd() -> None:
    summary = summarize(frame(row("filter-l1", 0, 90.0)))
    assert summary.loc[0, "n"] == 1 and math.isnan(summary.loc[0, "top1_sd"])
    assert "90.00 |" in summary_markdown(summary) and "±" not in summary_markdown(summary)
    assert summary_records(summary)[0]["top1_sd"] is None


def test_duplicate_run_id_counts_once_keeping_the_last() -> None:
    first, copy = row("filter-l1", 0, 80.0), row("filter-l1", 0, 85.0)  # same run_id
    got = only(summarize(frame(first, row("filter-l1", 1, 87.0), copy)), "filter-l1")
    assert got["n"] == 2
    assert got["top1_mean"] == pytest.approx(86.0)


def test_rows_without_run_id_are_runs_of_their_own() -> None:
    rows = [row("filter-l1", 0, 80.0, run_id=""), row("filter-l1", 0, 82.0, run_id="")]
    assert only(summarize(frame(*rows)), "filter-l1")["n"] == 2


def test_reported_rows_are_never_averaged_in() -> None:
    reported = row("filter-l1", 1, 10.0, source="reported", run_id="paper")
    got = only(summarize(frame(row("filter-l1", 0, 90.0), reported)), "filter-l1")
    assert (got["n"], got["top1_mean"]) == (1, 90.0)


def test_masked_rows_count_non_zero_macs() -> None:
    masked = [
        row("weight-magnitude", s, 91.0, granularity="weight", macs=1000, macs_nonzero=436)
        | {"macs_reduction_pct": 0.0}
        for s in (0, 1)
    ]
    summary = summarize(frame(*masked, row("filter-l1", 0, 90.0)))
    got = only(summary, "weight-magnitude")
    assert got["masked"] and got["macs_removed_pct_mean"] == pytest.approx(56.4)
    assert got["theory_speedup"] == pytest.approx(1.0)  # what runs is dense
    assert not only(summary, "filter-l1")["masked"]
    assert "56.40 (masked)" in summary_markdown(summary)
    assert "56.40 (masked)" in summary_text(summary)
    assert "40.00 |" in summary_markdown(summary)


def test_a_few_masked_weights_beside_physical_pruning_are_not_a_masked_row() -> None:
    """SG-CNN: per-group convs remove 400 MACs physically, its masked FC zeroes 5 more."""
    sg = row("sgcnn", 0, 90.0, granularity="grouped_kernel", macs=600, macs_nonzero=595)
    got = only(summarize(frame(sg)), "sgcnn")
    assert not got["masked"] and got["macs_removed_pct_mean"] == pytest.approx(40.0)
    assert got["theory_speedup"] == pytest.approx(1000 / 600)


def test_groups_and_deterministic_order() -> None:
    rows = [
        row("b", 0, 90.0, target=0.5),
        row("a", 0, 91.0, target=0.5),
        row("c", 0, 95.0, target=0.3),
        row("c", 1, 80.0),  # empty target: the "native" group, first
        row("a", 1, 70.0, target=0.3),
        row("z", 0, 60.0, model="alexnet"),
    ]
    summary = summarize(frame(*rows))
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(zip(summary["model"], summary["target"], summary["method"], strict=True)) == [
        ("alexnet", NATIVE, "z"),
        ("resnet20", NATIVE, "c"),
        ("resnet20", "0.3", "c"),  # mean top1 descending within a target
        ("resnet20", "0.3", "a"),
        ("resnet20", "0.5", "a"),
        ("resnet20", "0.5", "b"),
    ]
    assert summarize(frame(*reversed(rows))).equals(summary)


def test_speedups_and_bench_batch() -> None:
    rows = [
        row("filter-l1", s, 90.0, speedup_b1=b1, speedup_bN=bn, bench_batch=32, device="cpu")
        for s, (b1, bn) in enumerate([(1.2, 1.5), (1.4, 1.7)])
    ]
    got = only(summarize(frame(*rows)), "filter-l1")
    assert got["speedup_b1_mean"] == pytest.approx(1.3)
    assert got["speedup_bN_mean"] == pytest.approx(1.6)
    assert got["speedup_b1_sd"] == pytest.approx(statistics.stdev([1.2, 1.4]))
    assert (got["bench_batch"], got["device"]) == ("32", "cpu")
    assert "1.30 ± 0.14" in summary_markdown(summarize(frame(*rows)))


def test_speedups_come_from_one_machine_and_accuracy_from_all() -> None:
    """Speed-ups of a group are those of the machine of its last timed row; rows timed on
    another processor count for accuracy only; the table says where they were timed."""
    timed = {"bench_batch": 32, "device": "cpu"}
    rows = [
        row("filter-l1", 0, 90.0, speedup_b1=1.1, speedup_bN=1.2, cpu_name="Xeon", **timed),
        row("filter-l1", 1, 91.0, speedup_b1=1.5, speedup_bN=1.6, cpu_name="EPYC", **timed),
        row("filter-l1", 2, 92.0, speedup_b1=1.7, speedup_bN=1.8, cpu_name="EPYC", **timed),
        row("filter-l1", 3, 93.0),  # not timed: counts for accuracy, does not pick the machine
    ]
    got = only(summarize(frame(*rows)), "filter-l1")
    assert got["n"] == 4 and got["top1_mean"] == pytest.approx(91.5)
    assert got["speedup_b1_mean"] == pytest.approx(1.6) and got["machine"] == "EPYC"
    assert got["speedup_bN_mean"] == pytest.approx(1.7)
    assert "| EPYC |" in summary_markdown(summarize(frame(*rows)))
    panels = set(speedup_points(frame(*rows))["panel"])
    assert panels == {"cpu (EPYC), torch, batch 1", "cpu (EPYC), torch, batch 32"}
    gpu = row("filter-l1", 4, 90.0, speedup_b1=3.0, device="cuda", gpu_name="H200",
              cpu_name="EPYC")  # fmt: skip
    got = only(summarize(frame(*rows, gpu)), "filter-l1")
    assert got["speedup_b1_mean"] == 3.0 and got["machine"] == "H200"


def test_text_table_is_aligned_and_markdown_is_a_table() -> None:
    rows = [row("filter-l1", s, 90.0 + s) for s in (0, 1)] + [row("gkp|x", 0, 88.0)]
    summary = summarize(frame(*rows))
    lines = summary_text(summary).splitlines()
    assert len(lines) == 2 + len(summary)
    starts = [line.index("resnet20") for line in lines[2:]]
    assert set(starts) == {0}
    assert lines[1].startswith("--------")
    markdown = summary_markdown(summary).splitlines()
    assert len(markdown) == 2 + len(summary)
    assert all(line.startswith("| ") and line.endswith(" |") for line in markdown[2:])
    assert "90.50 ± 0.71" in markdown[2]
    assert "gkp\\|x" in markdown[3]  # a pipe in a name does not break the table


def test_records_are_json() -> None:
    rows = [row("filter-l1", 0, 90.0), row("channel-bn", 0, 89.0, granularity="channel")]
    records = summary_records(summarize(frame(*rows)))
    assert json.loads(json.dumps(records, allow_nan=False)) == records
    assert records[0]["method"] == "filter-l1" and records[0]["n"] == 1
    assert type(records[0]["n"]) is int and type(records[0]["masked"]) is bool
    assert records[0]["speedup_b1_mean"] is None


def test_empty_leaderboard(tmp_path: Path) -> None:
    summary = summary_from_csv(tmp_path / "absent.csv")
    assert summary.empty and list(summary.columns) == SUMMARY_COLUMNS
    assert summarize(read_leaderboard(tmp_path / "absent.csv")).empty
    assert summary_text(summary) == "no measured rows\n"
    assert summary_markdown(summary) == "no measured rows\n"
    assert summary_records(summary) == []
    reported_only = frame(row("x", 0, 1.0, source="reported"))
    assert summary_text(summarize(reported_only)) == "no measured rows\n"
