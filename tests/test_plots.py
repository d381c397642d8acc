"""Figures come only from the CSVs, one per (model, dataset), and regenerate byte for byte."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from benchmarks.leaderboard import append_row, empty_row
from benchmarks.plots import PALETTE, method_colors, plot_all

ROOT = Path(__file__).resolve().parents[1]
LITERATURE = ROOT / "results" / "literature.csv"
MAGENTA = "#ff00ff"  # used by no palette entry, so its pixels can only come from `colors`


def _row(method: str, granularity: str, model: str, macs: int, top1: float, **extra) -> dict:
    """A measured row; reductions derived by hand from macs_dense = 1000, params 100 -> 50."""
    return (
        empty_row()
        | {
            "date": "2025-01-31T12:00:00Z",
            "source": "measured",
            "method": method,
            "granularity": granularity,
            "faithfulness": "reconstructed",
            "model": model,
            "dataset": "cifar10",
            "recipe": "cpu-tiny",
            "seed": 0,
            "macs_dense": 1000,
            "macs": macs,
            "macs_reduction_pct": 100 * (1 - macs / 1000),
            "params_dense": 100,
            "params": 50,
            "params_reduction_pct": 50.0,
            "finetune_epochs": 1,
            "top1_dense": 93.0,
            "top1_pruned_before_ft": 10.0,
            "git_commit": "0123456789ab",
            "command": "gkp-bench prune",
            "run_id": f"test-{method}-{model}",
            "top1": top1,
        }
        | extra
    )


@pytest.fixture()
def board(tmp_path: Path) -> Path:
    path = tmp_path / "leaderboard.csv"
    append_row(
        path,
        _row(
            "tmi-gkp",
            "grouped_kernel",
            "resnet56",
            560,
            92.5,
            device="cpu",
            latency_b1_ms=2.0,
            latency_b1_dense_ms=3.0,
            speedup_b1=1.5,
            latency_bN_ms=10.0,
            latency_bN_dense_ms=16.0,
            speedup_bN=1.6,
        ),
    )
    append_row(
        path,
        _row(
            "l1-filter",
            "filter",
            "resnet56",
            500,
            91.0,
            device="cpu",
            latency_b1_ms=1.5,
            latency_b1_dense_ms=3.0,
            speedup_b1=2.0,
        ),
    )
    append_row(path, _row("magnitude", "weight", "tinynet", 1000, 80.0))
    return path


@pytest.fixture()
def small_literature(tmp_path: Path) -> Path:
    """The real literature's header and ResNet-56 rows: enough to draw hollow markers, quickly."""
    lines = LITERATURE.read_text().splitlines()
    path = tmp_path / "literature.csv"
    path.write_text("\n".join([lines[0], *(x for x in lines if x.startswith("resnet56,"))]) + "\n")
    return path


def _expected_names() -> set[str]:
    with LITERATURE.open(newline="") as handle:
        pairs = {(r["model"], r["dataset"]) for r in csv.DictReader(handle)}
    pairs |= {("resnet56", "cifar10"), ("tinynet", "cifar10")}
    return {f"acc_vs_macs_{m}_{d}.png" for m, d in pairs} | {"speedup_vs_theory.png"}


def test_plot_all_writes_one_figure_per_model_dataset(board: Path, tmp_path: Path) -> None:
    written = plot_all(board, LITERATURE, tmp_path / "figures")
    assert {p.name for p in written} == _expected_names()
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(_expected_names())
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regenerating_gives_identical_bytes(
    board: Path, small_literature: Path, tmp_path: Path
) -> None:
    """Same data, another process with another hash seed (set order): the same bytes."""
    first = plot_all(board, small_literature, tmp_path / "a")
    assert len(first) == 3
    script = (
        "import sys; from benchmarks.plots import plot_all; "
        "plot_all(sys.argv[1], sys.argv[2], sys.argv[3])"
    )
    env = os.environ | {"PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", script, str(board), str(small_literature), str(tmp_path / "b")],
        check=True,
        env=env,
        cwd=ROOT,
    )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in first)
    assert all((tmp_path / "b" / p.name).read_bytes() == p.read_bytes() for p in first)


def test_given_colours_are_used(board: Path, small_literature: Path, tmp_path: Path) -> None:
    def magenta_pixels(colors: dict[str, str] | None) -> int:
        plot_all(board, small_literature, tmp_path / "m", colors=colors)
        image = imread(tmp_path / "m" / "acc_vs_macs_resnet56_cifar10.png")[..., :3]
        return int(np.all(np.abs(image - [1.0, 0.0, 1.0]) < 0.02, axis=-1).sum())

    assert magenta_pixels(None) == 0
    assert magenta_pixels({"tmi-gkp": MAGENTA}) > 50


def test_method_colours_are_deterministic_and_overridable() -> None:
    colours = method_colors(["b", "a", "c", "a"], {"c": MAGENTA})
    assert colours == {"a": PALETTE[0], "b": PALETTE[1], "c": MAGENTA}


def test_empty_inputs_write_nothing(tmp_path: Path) -> None:
    header_only = tmp_path / "literature.csv"
    header_only.write_text(LITERATURE.read_text().splitlines()[0] + "\n")
    out = tmp_path / "figures"
    assert plot_all(tmp_path / "absent.csv", header_only, out) == []
    assert plot_all(tmp_path / "absent.csv", None, out) == []
    assert not out.exists()
