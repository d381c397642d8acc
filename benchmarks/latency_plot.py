"""``latency_backends.png``: measured vs ideal speed-up, one panel per backend and one row of
panels per machine (GPU rows get their own, titled ``<backend> (cuda)``, and so do CPU rows of
several processors, titled ``<backend> (<cpu_name>)``), from latency.csv.

Each point is one (method, model, batch, threads) of ``results/latency.csv`` (the last row when a
run id was timed again): x = ideal speed-up (``macs_dense / macs`` of the deployed network),
y = measured speed-up against dense *on the same backend*, with a vertical bar over its 95%
interval where the row has one (``speedup_low``-``speedup_high``: rows of 6 or more rounds since
the interval was recorded). Colours: one per method (as in the other figures); markers: one per
(model, batch). The dashed diagonal is the ideal, the dotted
line no speed-up. Same CSV, same PNG (Agg, default style, no metadata). ``gkp-bench plot`` draws
the CPU rows since :data:`benchmarks.latency.CPU_SINCE` only (earlier ones come from another
machine, and one panel must not mix machines); GPU rows are all drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib.style
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from benchmarks.backends import BACKENDS
from benchmarks.latency import cpu_names, current_cpu_rows, last_rows, read_latency
from benchmarks.plots import DPI, method_colors

NAME = "latency_backends.png"
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def latency_figure(
    latency_csv: str | os.PathLike,
    colors: Mapping[str, str] | None = None,
    cpu_since: str | None = None,
):
    """The figure (None when no row is left); ``cpu_since``: leave out CPU rows dated before it
    (:func:`benchmarks.latency.current_cpu_rows`)."""
    frame = current_cpu_rows(read_latency(latency_csv), cpu_since)
    if frame.empty:
        return None
    frame = last_rows(frame)
    cpus = cpu_names(frame)
    several = len(cpus) > 1  # then each CPU panel names its processor
    present = set(zip(frame["backend"], frame["machine"], strict=True))
    machines = cpus + sorted(set(frame.loc[frame["device"] != "cpu", "machine"]))
    rows = [[b for b in BACKENDS if (b, m) in present] for m in machines]  # a row per machine
    palette = method_colors(sorted(set(frame["method"])), colors)
    kinds = sorted({(m, int(b)) for m, b in zip(frame["model"], frame["batch"], strict=True)})
    marker = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(kinds)}
    ncols = max(len(r) for r in rows)
    width = 4.2 * ncols + 2.6
    fig = Figure(figsize=(width, 4.2 * len(machines)), dpi=DPI)
    grid = fig.subplots(len(machines), ncols, squeeze=False)
    panels, axes = [], []
    for r, (where, backends) in enumerate(zip(machines, rows, strict=True)):
        for c in range(ncols):
            if c >= len(backends):
                fig.delaxes(grid[r][c])  # a machine with fewer backends: no empty panel
                continue
            panels.append((backends[c], "cpu" if where in cpus else where, where))
            axes.append(grid[r][c])
        grid[r][0].set_ylabel("measured speed-up vs dense, same backend")
    top = max(frame["ideal"].max(), frame["speedup"].max(), 1.0) * 1.08
    for ax, (backend, device, where) in zip(axes, panels, strict=True):
        part = frame[(frame["backend"] == backend) & (frame["machine"] == where)]
        part = part.sort_values(["method", "model", "batch"])
        ax.plot([0, top], [0, top], "k--", linewidth=1)
        ax.axhline(1, color="0.5", linestyle=":", linewidth=1)
        for row in part.itertuples():
            style = {"color": palette[row.method], "marker": marker[(row.model, int(row.batch))]}
            ax.plot(row.ideal, row.speedup, linestyle="none", markersize=6, alpha=0.85, **style)
            if math.isfinite(row.speedup_low) and math.isfinite(row.speedup_high):  # NaN: none
                ax.vlines(row.ideal, row.speedup_low, row.speedup_high, colors=style["color"],
                          linewidth=1, alpha=0.6)  # fmt: skip
        title = f"{backend} ({where})" if device != "cpu" or several else backend
        ax.set(title=title, xlim=(0.8, top), ylim=(0, top), xlabel="ideal speed-up (MACs ratio)")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=palette[m], marker="o", linestyle="none", label=m)
               for m in sorted(palette)]  # fmt: skip
    handles += [Line2D([], [], color="0.3", marker=marker[k], linestyle="none",
                       label=f"{k[0]} batch {k[1]}") for k in kinds]  # fmt: skip
    fig.legend(handles=handles, loc="center right", fontsize="small", frameon=False)
    fig.subplots_adjust(left=0.06, right=1 - 2.6 / width, wspace=0.25, hspace=0.35,
                        bottom=0.13 / len(machines), top=1 - 0.1 / len(machines))  # fmt: skip
    return fig


def plot_latency(
    latency_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    colors=None,
    cpu_since: str | None = None,
) -> list[Path]:
    """Write ``latency_backends.png`` into ``out_dir`` when the CSV has rows (``cpu_since``: as
    :func:`latency_figure`); the paths written."""
    if not Path(latency_csv).exists():
        return []
    with matplotlib.style.context("default"):
        fig = latency_figure(latency_csv, colors, cpu_since)
        if fig is None:
            return []
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / NAME, format="png", dpi=DPI, metadata={"Software": None})
    return [out / NAME]
