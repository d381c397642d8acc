"""Figures made only from the result CSVs, so anyone can regenerate them without re-running.

Accuracy (``acc_vs_macs_<model>_<dataset>.png``, one per model/dataset in either CSV): two panels,
top-1 and Δ top-1 = ``top1 - top1_dense`` (each row against its own dense baseline), against MACs
removed. Measured rows are grouped like ``benchmarks.summary.summarize`` (method, model, dataset,
recipe, target; one row per ``run_id``): one marker at the means, with ± 1 sample-sd error bars
when the group has more than one run. Reported rows (leaderboard rows with ``source`` reported,
and ``literature.csv``) are hollow, one per row. Masked methods (most removed MACs are zeros
that still run, see ``benchmarks.summary``: the deployed model is dense) sit at their *non-zero*
MACs removed and are drawn half-filled,
which the legend explains as "masked, no dense speed-up".

Speed-up (``speedup_vs_theory.png``, measured rows with speed-ups): one panel per device and
batch kind (batch 1, throughput batch N), measured speed-up (mean ± sd over runs) against the
theoretical speed-up *of what runs*, ``macs_dense / macs``, with the ideal diagonal. Masked rows
therefore sit at x = 1 (their deployed form does all dense MACs), half-filled: what a sparse kernel
could reach (``macs_dense / macs_nonzero``) is not something this benchmark runs, and plotting it
would credit them with a speed-up nobody measured.

Colours: one per method, never shared: a method in ``colors`` (the registry's) keeps its colour;
any other (e.g. a paper's name) gets a palette colour no given colour uses (``method_colors``).
Markers: one per granularity. Determinism: the same CSVs give byte-identical PNGs. Figures are
drawn on plain ``Figure`` objects rendered by Agg (no pyplot state, no GUI backend), under
matplotlib's default style, at a fixed size and dpi, with the PNG "Software" metadata removed, and
every iteration is over sorted keys.
"""

from __future__ import annotations

import colorsys
import itertools
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import matplotlib.style
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from benchmarks.leaderboard import read_leaderboard, read_literature
from benchmarks.summary import accuracy_points, speedup_points

# tab10, then tab20's light shades: distinct first, then still distinguishable
PALETTE = tuple(to_hex(c) for c in (*colormaps["tab10"].colors, *colormaps["tab20"].colors[1::2]))
MARKERS = {"weight": "o", "kernel": "s", "grouped_kernel": "D", "filter": "^", "channel": "v"}
OTHER_MARKER = "X"  # a granularity without a marker of its own
MASKED_FILL = "left"  # masked rows: half-filled markers
PANEL = (5.5, 4.5)  # inches per panel; fixed margins (no layout engine: faster, no reflow)
TAGGED = ("reconstructed", "variant")  # faithfulness labels the legends carry
LEGEND_WIDTH = 2.6  # inches per legend column, to the right of the panels
LEGEND_LINES = 20  # lines of text per legend column
DPI = 100
GREY = "#555555"
_X_ACC = "MACs removed (%): measured conv+linear (fvcore), masked = non-zero; reported as published"
MASKED_LABEL = "masked: zeroed weights, runs\ndense (no dense speed-up);\nx = non-zero MACs removed"
BARS_LABEL = "± 1 sd over runs (n > 1)"


def _candidates() -> Iterator[str]:
    """Colours to hand out, in order: the palette, tab20b, tab20c, then golden-ratio hues."""
    yield from PALETTE
    for name in ("tab20b", "tab20c"):
        yield from (to_hex(c) for c in colormaps[name].colors)
    for i in itertools.count():
        yield to_hex(colorsys.hsv_to_rgb((i * 0.618033988749895) % 1, 0.75, 0.8))


def method_colors(methods: list[str], colors: Mapping[str, str] | None = None) -> dict[str, str]:
    """A distinct colour per method, in sorted-name order.

    A method in ``colors`` keeps its colour, unless an alphabetically earlier method was given the
    same one. Every other method gets the next candidate colour (the palette first) that no given
    colour (of any method, plotted or not) and no colour handed out so far uses.
    """
    given = dict(colors or {})
    taken = {to_hex(c) for c in given.values()}
    out: dict[str, str] = {}
    used: set[str] = set()
    fresh = (c for c in _candidates() if to_hex(c) not in taken)
    for method in sorted(set(methods)):
        color = given.get(method)
        if color is None or to_hex(color) in used:
            color = next(c for c in fresh if to_hex(c) not in used)
        out[method] = color
        used.add(to_hex(color))
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def _style(color: str, granularity: str, hollow: bool, masked: bool = False) -> dict:
    """Line2D keywords: colour per method, marker per granularity, hollow reported, half masked."""
    style = {
        "linestyle": "none",
        "marker": MARKERS.get(granularity, OTHER_MARKER),
        "markersize": 8,
        "markeredgewidth": 1.5,
        "color": color,
        "markerfacecolor": "none" if hollow else color,
    }
    if masked:
        style |= {"fillstyle": MASKED_FILL, "markerfacecoloralt": "white"}
    return style


def _draw(ax: Axes, points: pd.DataFrame, palette: Mapping[str, str], y="y", yerr="yerr") -> None:
    """One plot call per (method, granularity, hollow, masked) group, in sorted order, and
    ± sd error bars for the markers that average more than one run."""
    groups = points.groupby(["method", "granularity", "hollow", "masked"], sort=True)
    for (method, granularity, hollow, masked), group in groups:
        style = _style(palette[method], granularity, bool(hollow), bool(masked))
        ax.plot(group["x"].to_numpy(), group[y].to_numpy(), **style)
        bars = group[(group["n"] > 1) & group[yerr].notna()] if yerr in group else group.iloc[:0]
        if len(bars):
            ax.errorbar(
                bars["x"].to_numpy(),
                bars[y].to_numpy(),
                yerr=bars[yerr].to_numpy(),
                fmt="none",
                ecolor=style["color"],
                elinewidth=1.2,
                capsize=3,
                zorder=1.9,  # under the markers
            )


def _handles(
    points: pd.DataFrame, palette: Mapping[str, str], tags: Mapping[str, str] | None = None
) -> list[Line2D]:
    """Legend entries: methods (colour; ``tags`` adds e.g. "[reconstructed]"), granularities
    (marker), source (fill), and, when plotted, masked markers and error bars; section titles
    have no marker."""
    tags = tags or {}
    masked, bars = points["masked"].any(), (points["n"] > 1).any()
    sections = {
        "method": [
            Line2D([], [], label=tags.get(m, m), **_style(palette[m], "", False) | {"marker": "s"})
            for m in sorted(points["method"].unique())
        ],
        "granularity": [
            Line2D([], [], label=g, **_style(GREY, g, False))
            for g in sorted(points["granularity"].unique())
        ],
        "source": [
            Line2D([], [], label=label, **_style(GREY, "", hollow) | {"marker": "o"})
            for label, hollow in (("measured (mean of runs)", False), ("reported", True))
            if hollow in set(points["hollow"])
        ],
        "marks": [
            Line2D([], [], label=MASKED_LABEL, **_style(GREY, "", False, True) | {"marker": "o"})
        ][: int(masked)]
        + [
            Line2D(
                [], [], color=GREY, marker="|", markersize=12, linestyle="none", label=BARS_LABEL
            )
        ][: int(bars)],
    }
    handles = []
    for title, items in sections.items():
        if items:
            handles += [Line2D([], [], linestyle="none", label=title), *items]
    return handles


def _figure(panels: int, handles: list[Line2D]) -> Figure:
    """Side-by-side axes with fixed margins, and the legend in columns to their right."""
    lines = sum(h.get_label().count("\n") + 1 for h in handles)
    columns = max(1, math.ceil(lines / LEGEND_LINES))
    legend = LEGEND_WIDTH * columns
    width = PANEL[0] * panels + legend
    fig = Figure(figsize=(width, PANEL[1]), dpi=DPI)
    fig.subplots_adjust(
        left=0.9 / width, right=1 - (legend + 0.1) / width, bottom=0.13, top=0.91, wspace=0.3
    )
    text = fig.legend(
        handles=handles,
        loc="upper left",
        ncol=columns,
        fontsize="small",
        frameon=False,
        bbox_to_anchor=(1 - legend / width, 0.93),
    )
    for handle, label in zip(handles, text.get_texts(), strict=True):
        if handle.get_marker() in ("None", None, ""):  # a section title
            label.set_fontweight("bold")
    return fig


def _accuracy_figure(model: str, dataset: str, points: pd.DataFrame, palette, tags) -> Figure:
    fig = _figure(2, _handles(points, palette, tags))
    top, delta = fig.subplots(1, 2)
    _draw(top, points, palette)
    _draw(delta, points.dropna(subset=["delta"]), palette, "delta", "delta_err")
    dense = points.loc[~points["hollow"], "dense"].dropna()
    if len(dense):  # the measured dense baseline(s) the pruned rows started from
        level = float(dense.mean())
        top.axhline(level, color="0.4", linestyle="--", linewidth=1)
        top.annotate("dense (measured, mean)", (0.01, level), xycoords=("axes fraction", "data"))
    delta.axhline(0, color="0.4", linestyle="--", linewidth=1)
    delta.annotate("each row's own dense", (0.01, 0), xycoords=("axes fraction", "data"))
    for ax, what in ((top, "top-1 accuracy (%)"), (delta, "Δ top-1 vs own dense (pp)")):
        ax.set(title=f"{model} on {dataset}: {what.split(' (')[0]}", xlabel=_X_ACC, ylabel=what)
        ax.xaxis.label.set_fontsize("x-small")
        ax.grid(alpha=0.3)
        for text in ax.texts:
            text.set(fontsize="small", color="0.3", va="bottom")
    return fig


def _speedup_figure(points: pd.DataFrame, palette: Mapping[str, str], tags) -> Figure:
    panels = list(dict.fromkeys(points["panel"]))
    fig = _figure(len(panels), _handles(points, palette, tags))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        chosen = points[points["panel"] == panel]
        top = max(chosen["x"].max(), (chosen["y"] + chosen["yerr"].fillna(0)).max(), 1.0) * 1.05
        ax.plot([0, top], [0, top], "k--", linewidth=1, label="ideal: speed-up = MAC ratio")
        ax.axhline(1, color="0.5", linestyle=":", linewidth=1, label="no speed-up")
        _draw(ax, chosen, palette)
        ax.set(
            title=panel,
            xlim=(0, top),
            ylim=(0, top),
            xlabel="theoretical speed-up of what runs (macs_dense / macs; masked = 1)",
            ylabel="measured speed-up (dense / pruned latency)",
        )
        ax.xaxis.label.set_fontsize("small")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize="small")
    return fig


def _figures(board: pd.DataFrame, literature: pd.DataFrame | None, colors) -> dict[str, Figure]:
    """Every figure the frames support, by file name (call under the default style)."""
    if literature is None:
        columns = ["model", "dataset", "method", "granularity", "macs_reduction_pct", "top1"]
        literature = board.iloc[0:0][[*columns, "top1_dense"]]
    palette = method_colors([*board["method"], *literature["method"]], colors)
    accuracy, speedup = accuracy_points(board, literature), speedup_points(board)
    tags = method_tags(board)
    figures = {}
    for (model, dataset), points in accuracy.groupby(["model", "dataset"], sort=True):
        name = f"acc_vs_macs_{_slug(model)}_{_slug(dataset)}.png"
        figures[name] = _accuracy_figure(model, dataset, points, palette, tags)
    if not speedup.empty:
        figures["speedup_vs_theory.png"] = _speedup_figure(speedup, palette, tags)
    return figures


def method_tags(board: pd.DataFrame) -> dict[str, str]:
    """Legend labels that carry a measured method's label when it is not the paper's method
    as published: "group2d [reconstructed]", "gkp-l2 [variant]"."""
    if "faithfulness" not in board:
        return {}
    first = board.dropna(subset=["faithfulness"]).groupby("method")["faithfulness"].first()
    return {m: f"{m} [{f}]" for m, f in first.items() if f in TAGGED}


def make_figures(
    leaderboard_csv: str | os.PathLike,
    literature_csv: str | os.PathLike | None,
    colors: Mapping[str, str] | None = None,
) -> dict[str, Figure]:
    """The figures ``plot_all`` would write, by file name, unsaved (for inspection)."""
    board = read_leaderboard(leaderboard_csv)
    literature = read_literature(literature_csv) if literature_csv is not None else None
    with matplotlib.style.context("default"):
        return _figures(board, literature, colors)


def plot_all(
    leaderboard_csv: str | os.PathLike,
    literature_csv: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    colors: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write every figure the CSVs support into ``out_dir``; return the paths written.

    One ``acc_vs_macs_<model>_<dataset>.png`` per (model, dataset) with plottable points in either
    CSV, and ``speedup_vs_theory.png`` when measured leaderboard rows carry speed-ups. No data, no
    files. ``literature_csv`` may be None to leave the papers' numbers out.
    """
    board = read_leaderboard(leaderboard_csv)
    literature = read_literature(literature_csv) if literature_csv is not None else None
    out = Path(out_dir)
    written = []
    with matplotlib.style.context("default"):
        for name, fig in _figures(board, literature, colors).items():
            out.mkdir(parents=True, exist_ok=True)
            fig.savefig(out / name, format="png", dpi=DPI, metadata={"Software": None})
            written.append(out / name)
    return written
