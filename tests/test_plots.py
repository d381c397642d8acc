"""Figures come only from the CSVs, one per (model, dataset), and regenerate byte for byte."""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer
from matplotlib.image import imread

from benchmarks.leaderboard import append_row, empty_row, read_leaderboard
from benchmarks.plots import (
    BARS_LABEL,
    MARKERS,
    MASKED_LABEL,
    OTHER_MARKER,
    PALETTE,
    make_figures,
    method_colors,
    plot_all,
)
from benchmarks.summary import accuracy_points

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


# ------------------------------------------------------------------------ seeds, masks, colours


def _timed(b1: float, bn: float) -> dict:
    """Latency columns with the given speed-ups (dense 10 ms at batch 1, 80 ms at batch 32)."""
    return {
        "device": "cpu",
        "bench_batch": 32,
        "latency_b1_dense_ms": 10.0,
        "latency_b1_ms": 10.0 / b1,
        "speedup_b1": b1,
        "latency_bN_dense_ms": 80.0,
        "latency_bN_ms": 80.0 / bn,
        "speedup_bN": bn,
    }


TMI_TOP1 = (92.0, 92.5, 93.5)


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """resnet56: tmi-gkp over 3 seeds, a masked method over 2, filter-l1 once plus a copy of it."""
    path = tmp_path / "mixed.csv"
    for seed, top1 in enumerate(TMI_TOP1):
        extra = _timed(1.3 + seed / 10, 1.5) | {"seed": seed, "run_id": f"tmi-{seed}"}
        append_row(path, _row("tmi-gkp", "grouped_kernel", "resnet56", 560, top1, **extra))
    for seed in (0, 1):
        extra = _timed(1.0, 0.98) | {"seed": seed, "run_id": f"wm-{seed}", "macs_nonzero": 400}
        append_row(path, _row("weight-magnitude", "weight", "resnet56", 1000, 90.0, **extra))
    filter_row = _row("filter-l1", "filter", "resnet56", 500, 91.0, **_timed(1.8, 1.9))
    append_row(path, filter_row)
    append_row(path, filter_row)  # a copied row: same run_id, counted once
    return path


def _marker_lines(ax) -> list[tuple[str, tuple[float, ...]]]:
    """(fill style, x values rounded) of every marker series an axes draws (not error-bar caps)."""
    return [
        (line.get_fillstyle(), tuple(round(float(x), 6) for x in line.get_xdata()))
        for line in ax.lines
        if line.get_marker() in {*MARKERS.values(), OTHER_MARKER}
    ]


def _legend_methods(fig) -> dict[str, str]:
    """Method name -> hex colour, read from the figure legend's "method" section (a label's
    "[reconstructed]"/"[variant]" tag dropped)."""
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    section = labels[labels.index("method") + 1 : labels.index("granularity")]
    handles = dict(zip(labels, legend.legend_handles, strict=True))
    return {m.split(" [")[0]: to_hex(handles[m].get_color()) for m in section}


def test_legends_carry_reconstructed_and_variant_labels(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    append_row(path, _row("kpgp", "grouped_kernel", "resnet20", 560, 90.0))
    append_row(
        path, _row("sgcnn", "grouped_kernel", "resnet20", 560, 90.0, faithfulness="faithful")
    )
    append_row(
        path, _row("gkp-l2", "grouped_kernel", "resnet20", 560, 90.0, faithfulness="variant")
    )
    fig = make_figures(path, None)["acc_vs_macs_resnet20_cifar10.png"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"kpgp [reconstructed]", "sgcnn", "gkp-l2 [variant]"} <= set(labels)


def test_masked_rows_are_half_filled_at_non_zero_macs(mixed: Path) -> None:
    figures = make_figures(mixed, None)
    accuracy = figures["acc_vs_macs_resnet56_cifar10.png"]
    assert len(accuracy.axes) == 2  # top-1 and Δ vs own dense
    for ax in accuracy.axes:
        lines = _marker_lines(ax)
        assert ("left", (60.0,)) in lines  # weight-magnitude: 100 * (1 - 400 / 1000)
        assert ("full", (50.0,)) in lines and ("full", (44.0,)) in lines
        assert not any(x == (0.0,) for _, x in lines)  # never at its dense 0% removed
    labels = [t.get_text() for t in accuracy.legends[0].get_texts()]
    assert MASKED_LABEL in labels and "no dense speed-up" in MASKED_LABEL.replace("\n", " ")
    speedup = figures["speedup_vs_theory.png"]
    for ax in speedup.axes:  # what runs is dense: theoretical speed-up 1
        assert ("left", (1.0,)) in _marker_lines(ax)
        assert ("full", (2.0,)) in _marker_lines(ax)


def test_error_bars_for_groups_of_several_runs_only(mixed: Path) -> None:
    board = read_leaderboard(mixed)
    points = accuracy_points(board, board.iloc[0:0])
    by_method = points.set_index("method")
    assert by_method.loc["filter-l1", "n"] == 1  # the copied row counted once
    assert by_method.loc["tmi-gkp", "n"] == 3
    assert by_method.loc["tmi-gkp", "y"] == pytest.approx(statistics.mean(TMI_TOP1))
    assert by_method.loc["tmi-gkp", "yerr"] == pytest.approx(statistics.stdev(TMI_TOP1))
    figure = make_figures(mixed, None)["acc_vs_macs_resnet56_cifar10.png"]
    top = figure.axes[0]
    bars = [c for c in top.containers if isinstance(c, ErrorbarContainer)]
    segments = [s for c in bars for s in c.lines[2][0].get_segments()]
    half = {round(float(s[0][0]), 6): (s[1][1] - s[0][1]) / 2 for s in segments}
    assert half.keys() == {44.0, 60.0}  # not filter-l1 (one run)
    assert half[44.0] == pytest.approx(statistics.stdev(TMI_TOP1))
    assert half[60.0] == 0  # weight-magnitude: two runs, equal top-1
    assert any(t.get_text() == BARS_LABEL for t in figure.legends[0].get_texts())
    speedup = make_figures(mixed, None)["speedup_vs_theory.png"]
    titles = [ax.get_title() for ax in speedup.axes]
    assert titles == ["cpu, torch, batch 1", "cpu, torch, batch 32"]  # rows that do not say
    for ax in speedup.axes:
        diagonal = ax.lines[0]
        assert list(diagonal.get_xdata()) == list(diagonal.get_ydata())  # the ideal line
        assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)


def test_plots_of_seeds_and_masks_are_deterministic(
    mixed: Path, small_literature: Path, tmp_path: Path
) -> None:
    first = plot_all(mixed, small_literature, tmp_path / "a")
    second = plot_all(mixed, small_literature, tmp_path / "b")
    assert len(first) == 2
    assert [p.name for p in first] == [p.name for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))


def test_unregistered_methods_never_take_a_given_colour() -> None:
    given = {"tmi-gkp": PALETTE[0], "sr-gkp": "tab:orange", "unplotted": PALETTE[2]}
    colours = method_colors(["amc", "chip", "dsp", "tmi-gkp", "sr-gkp"], given)
    assert colours["tmi-gkp"] == PALETTE[0] and colours["sr-gkp"] == "tab:orange"
    hexes = [to_hex(c) for c in colours.values()]
    assert len(set(hexes)) == len(hexes)
    assert not {to_hex(colours[m]) for m in ("amc", "chip", "dsp")} & {
        to_hex(c) for c in given.values()
    }


def test_colours_stay_unique_with_duplicate_given_colours_and_many_methods() -> None:
    colours = method_colors(["a", "b"], {"a": MAGENTA, "b": "#FF00FF"})
    assert colours["a"] == MAGENTA and to_hex(colours["b"]) != MAGENTA
    many = method_colors([f"m{i:03d}" for i in range(120)], {"m000": PALETTE[5]})
    assert len({to_hex(c) for c in many.values()}) == 120


def test_figure_legends_give_every_method_its_own_colour(mixed: Path) -> None:
    """Registered colours are kept; literature methods (amc sorts first) get other colours."""
    colors = {"tmi-gkp": PALETTE[0], "filter-l1": PALETTE[1], "weight-magnitude": "#d62728"}
    figures = make_figures(mixed, LITERATURE, colors=colors)
    legend = _legend_methods(figures["acc_vs_macs_resnet56_cifar10.png"])
    assert {"amc", "tmi-gkp", "filter-l1", "weight-magnitude"} <= legend.keys()
    assert legend["tmi-gkp"] == PALETTE[0] and legend["weight-magnitude"] == "#d62728"
    assert len(set(legend.values())) == len(legend)
