"""Figures made only from the result CSVs, so anyone can regenerate them without re-running.

Determinism: the same CSVs give byte-identical PNGs. Figures are drawn on plain ``Figure`` objects
rendered by Agg (no pyplot state, no GUI backend), under matplotlib's default style (a user's
matplotlibrc cannot change them), at a fixed size and dpi, with the PNG "Software" metadata removed
(Agg writes no timestamp), and every iteration is over sorted keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import matplotlib.style
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from benchmarks.leaderboard import read_leaderboard, read_literature

PALETTE = (  # tab10, then tab20's light shades: distinct first, then still distinguishable
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
)
MARKERS = {"weight": "o", "kernel": "s", "grouped_kernel": "D", "filter": "^", "channel": "v"}
OTHER_MARKER = "X"  # a granularity without a marker of its own
PANEL = (5.5, 4.5)  # inches per panel; fixed margins (no layout engine: faster, no reflow)
LEGEND_WIDTH = 2.3  # inches to the right of the panels
DPI = 100
_X_ACC = "MACs removed (%): measured rows conv+linear (fvcore); reported rows as each paper counts"


def method_colors(methods: list[str], colors: Mapping[str, str] | None = None) -> dict[str, str]:
    """A colour per method: ``colors`` where given, else the palette in sorted-name order."""
    given = dict(colors or {})
    return {m: given.get(m, PALETTE[i % len(PALETTE)]) for i, m in enumerate(sorted(set(methods)))}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def _style(color: str, granularity: str, hollow: bool) -> dict:
    """Line2D keywords: colour per method, marker per granularity, hollow for reported rows."""
    return {
        "linestyle": "none",
        "marker": MARKERS.get(granularity, OTHER_MARKER),
        "markersize": 8,
        "markeredgewidth": 1.5,
        "color": color,
        "markerfacecolor": "none" if hollow else color,
    }


def _accuracy_points(board: pd.DataFrame, literature: pd.DataFrame) -> pd.DataFrame:
    """Accuracy-vs-MACs points of both CSVs; ``hollow`` marks reported (not measured) rows."""
    keys = ["model", "dataset", "method", "granularity"]
    measured = board[keys].assign(
        x=board["macs_reduction_pct"],
        y=board["top1"],
        hollow=board["source"] != "measured",
        dense=board["top1_dense"],
    )
    reported = literature[keys].assign(
        x=literature["macs_reduction_pct"], y=literature["top1"], hollow=True
    )
    frames = [f for f in (measured, reported) if not f.empty]
    if not frames:
        return pd.DataFrame(columns=[*keys, "x", "y", "hollow", "dense"])
    points = pd.concat(frames, ignore_index=True).dropna(subset=["x", "y"])
    return points.sort_values([*keys, "hollow", "x", "y"], kind="mergesort")


def _speedup_points(board: pd.DataFrame) -> pd.DataFrame:
    """Measured vs theoretical (macs_dense / macs) speed-up, one point per row and batch kind."""
    parts = []
    for column, batch in (("speedup_b1", "batch 1"), ("speedup_bN", "throughput batch")):
        rows = board.dropna(subset=[column, "macs_dense", "macs"])
        rows = rows[rows["macs"] > 0]
        parts.append(
            pd.DataFrame(
                {
                    "panel": rows["device"].where(rows["device"] != "", "device ?") + ", " + batch,
                    "method": rows["method"],
                    "granularity": rows["granularity"],
                    "x": (rows["macs_dense"] / rows["macs"]).astype("float64"),
                    "y": rows[column].astype("float64"),
                    "hollow": rows["source"] != "measured",
                }
            )
        )
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=["panel", "method", "granularity", "x", "y", "hollow"])
    points = pd.concat(parts, ignore_index=True)
    return points.sort_values(["panel", "method", "granularity", "x", "y"], kind="mergesort")


def _draw(ax: Axes, points: pd.DataFrame, palette: Mapping[str, str]) -> None:
    """One plot call per (method, granularity, hollow) group, in sorted order."""
    for (method, granularity, hollow), group in points.groupby(
        ["method", "granularity", "hollow"], sort=True
    ):
        ax.plot(
            group["x"].to_numpy(),
            group["y"].to_numpy(),
            **_style(palette[method], granularity, bool(hollow)),
        )


def _legend(fig: Figure, points: pd.DataFrame, palette: Mapping[str, str]) -> None:
    """One legend: methods (colour), granularities (marker), measured vs reported (fill)."""
    grey = "#555555"
    sections = {
        "method": [
            Line2D([], [], label=m, **_style(palette[m], "", False) | {"marker": "s"})
            for m in sorted(points["method"].unique())
        ],
        "granularity": [
            Line2D([], [], label=g, **_style(grey, g, False))
            for g in sorted(points["granularity"].unique())
        ],
        "source": [
            Line2D([], [], label=label, **_style(grey, "", hollow) | {"marker": "o"})
            for label, hollow in (("measured", False), ("reported", True))
            if hollow in set(points["hollow"])
        ],
    }
    handles, titles = [], []
    for title, items in sections.items():
        titles.append(len(handles))
        handles += [Line2D([], [], linestyle="none", label=title), *items]
    width = fig.get_figwidth()
    legend = fig.legend(
        handles=handles,
        loc="upper left",
        fontsize="small",
        frameon=False,
        bbox_to_anchor=(1 - LEGEND_WIDTH / width, 0.93),
    )
    for index in titles:
        legend.get_texts()[index].set_fontweight("bold")


def _figure(panels: int) -> Figure:
    """A figure of ``panels`` side-by-side axes with fixed margins and room for the legend."""
    width = PANEL[0] * panels + LEGEND_WIDTH
    fig = Figure(figsize=(width, PANEL[1]), dpi=DPI)
    fig.subplots_adjust(
        left=0.9 / width, right=1 - (LEGEND_WIDTH + 0.1) / width, bottom=0.13, top=0.91, wspace=0.3
    )
    return fig


def _accuracy_figure(
    model: str, dataset: str, points: pd.DataFrame, palette: Mapping[str, str]
) -> Figure:
    fig = _figure(1)
    ax = fig.add_subplot()
    _draw(ax, points, palette)
    dense = (
        points.loc[~points["hollow"].astype(bool), "dense"].dropna() if "dense" in points else []
    )
    if len(dense):  # the measured dense baseline(s) the pruned rows started from
        ax.axhline(float(pd.Series(dense).mean()), color="0.4", linestyle="--", linewidth=1)
        ax.annotate(
            "dense baseline (measured)",
            (0.01, float(pd.Series(dense).mean())),
            xycoords=("axes fraction", "data"),
            fontsize="small",
            color="0.3",
            va="bottom",
        )
    ax.set(
        title=f"{model} on {dataset}: top-1 accuracy vs MACs removed",
        xlabel=_X_ACC,
        ylabel="top-1 accuracy (%)",
    )
    ax.xaxis.label.set_fontsize("small")
    ax.grid(alpha=0.3)
    _legend(fig, points, palette)
    return fig


def _speedup_figure(points: pd.DataFrame, palette: Mapping[str, str]) -> Figure:
    panels = sorted(points["panel"].unique())
    fig = _figure(len(panels))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        chosen = points[points["panel"] == panel]
        top = max(chosen["x"].max(), chosen["y"].max(), 1.0) * 1.05
        ax.plot([0, top], [0, top], "k--", linewidth=1, label="ideal: speed-up = MAC ratio")
        _draw(ax, chosen, palette)
        ax.set(
            title=panel,
            xlim=(0, top),
            ylim=(0, top),
            xlabel="theoretical speed-up (macs_dense / macs)",
            ylabel="measured speed-up (dense / pruned latency)",
        )
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize="small")
    _legend(fig, points, palette)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def plot_all(
    leaderboard_csv: str | os.PathLike,
    literature_csv: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    colors: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write every figure the CSVs support into ``out_dir``; return the paths written.

    One ``acc_vs_macs_<model>_<dataset>.png`` per (model, dataset) with plottable points in either
    CSV, and ``speedup_vs_theory.png`` when leaderboard rows carry speed-ups. No data, no files.
    ``literature_csv`` may be None to leave the papers' numbers out.
    """
    board = read_leaderboard(leaderboard_csv)
    literature = read_literature(literature_csv) if literature_csv is not None else None
    if literature is None:
        literature = board.iloc[0:0][
            ["model", "dataset", "method", "granularity", "macs_reduction_pct", "top1"]
        ]
    palette = method_colors([*board["method"], *literature["method"]], colors)
    accuracy, speedup = _accuracy_points(board, literature), _speedup_points(board)
    if accuracy.empty and speedup.empty:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.style.context("default"):
        for (model, dataset), points in accuracy.groupby(["model", "dataset"], sort=True):
            name = f"acc_vs_macs_{_slug(model)}_{_slug(dataset)}.png"
            written.append(_save(_accuracy_figure(model, dataset, points, palette), out / name))
        if not speedup.empty:
            written.append(_save(_speedup_figure(speedup, palette), out / "speedup_vs_theory.png"))
    return written
