"""Rewrite the generated result tables in README.md and results/README.md from the CSVs.

Each table sits between ``<!-- summary:start rows=N -->`` and ``<!-- summary:end -->`` and is
exactly the output of ``gkp-bench leaderboard summary --markdown`` over the leaderboard's first
``N`` rows (tests/test_readme.py checks it). The leaderboard is append-only, so rows a user adds
later (the README's main job appends some) leave the committed tables checkable. Likewise the
per-backend latency table between ``<!-- latency:start rows=N -->`` and ``<!-- latency:end -->``
is ``gkp-bench leaderboard latency`` over ``results/latency.csv``'s first ``N`` rows, and the
goal table between ``<!-- goals:start rows=N -->`` and ``<!-- goals:end -->`` is
``benchmarks.latency.goals_markdown`` over the same rows (both leave out the CPU rows measured
on an earlier machine, before ``benchmarks.latency.CPU_SINCE``, and keep processors apart),
and the
layer table between ``<!-- fused:start -->`` and ``<!-- fused:end -->`` is
``scripts/bench_fused.py --table results/fused_kernel.csv``, the Amdahl-bound table between
``<!-- amdahl:start -->`` and ``<!-- amdahl:end -->`` is ``scripts/amdahl_bound.py --table
results/amdahl.csv``, and the GPU tables between
``<!-- gpu:start -->`` and ``<!-- gpu:end -->`` are ``scripts/bench_gpu.py --table
results/gpu-direct --brief`` followed by the same of ``results/gpu-direct/sweep`` (the tile
sweep):

    .venv/bin/python scripts/readme_summary.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from benchmarks.latency import current_cpu_rows, goals_markdown, latency_markdown, read_latency
from benchmarks.leaderboard import read_leaderboard
from benchmarks.summary import summarize, summary_markdown

ROOT = Path(__file__).resolve().parent.parent
LEADERBOARD = ROOT / "results" / "leaderboard.csv"
FILES = (ROOT / "README.md", ROOT / "results" / "README.md")
BLOCK = re.compile(r"<!-- summary:start(?: rows=(\d+))? -->\n(.*?)<!-- summary:end -->", re.S)
LATENCY = ROOT / "results" / "latency.csv"
LATENCY_BLOCK = re.compile(r"<!-- latency:start rows=(\d+) -->\n(.*?)<!-- latency:end -->", re.S)
GOALS_BLOCK = re.compile(r"<!-- goals:start rows=(\d+) -->\n(.*?)<!-- goals:end -->", re.S)
FUSED = ROOT / "results" / "fused_kernel.csv"
FUSED_BLOCK = re.compile(r"<!-- fused:start -->\n(.*?)<!-- fused:end -->", re.S)
AMDAHL = ROOT / "results" / "amdahl.csv"
AMDAHL_BLOCK = re.compile(r"<!-- amdahl:start -->\n(.*?)<!-- amdahl:end -->", re.S)
GPU = ROOT / "results" / "gpu-direct"
GPU_BLOCK = re.compile(r"<!-- gpu:start -->\n(.*?)<!-- gpu:end -->", re.S)


def fused_generated() -> str:
    """The fused-kernel layer table of results/fused_kernel.csv."""
    import bench_fused

    return bench_fused.table(bench_fused.read_rows(FUSED))


def amdahl_generated() -> str:
    """The Amdahl-bound table of results/amdahl.csv."""
    import amdahl_bound

    return amdahl_bound.read_table(AMDAHL)


def gpu_generated() -> str:
    """The GPU tables of results/gpu-direct/ and of its tile sweep (the README's subset)."""
    import bench_gpu

    sweep = (
        "Tile sweep (`results/gpu-direct/sweep`, the session's first GPU run, whose direct "
        "kernel still had the tile 128 x min(d, 32), d = filters per group):"
    )
    main, swept = bench_gpu.tables(GPU, brief=True), bench_gpu.tables(GPU / "sweep", brief=True)
    return f"{main}\n{sweep}\n\n{swept}"


def current_rows(rows: int):
    """latency.csv's first ``rows`` rows, less CPU rows from before
    ``benchmarks.latency.CPU_SINCE`` (another machine's)."""
    return current_cpu_rows(read_latency(LATENCY).iloc[:rows])


def goals_generated(rows: int) -> str:
    """Issue 9's goals against latency.csv's first ``rows`` rows (this machine's CPU rows)."""
    return goals_markdown(current_rows(rows))


def latency_generated(rows: int) -> str:
    """The per-backend speed-up table over latency.csv's first ``rows`` rows (this machine's CPU
    rows)."""
    return latency_markdown(current_rows(rows))


def generated(rows: int | None = None) -> str:
    """The summary table over the leaderboard's first ``rows`` rows (all rows when None)."""
    frame = read_leaderboard(LEADERBOARD)
    if rows is not None:
        frame = frame.iloc[:rows]
    return summary_markdown(summarize(frame))


def main() -> int:
    rows = len(read_leaderboard(LEADERBOARD))
    table = generated(rows)
    block = f"<!-- summary:start rows={rows} -->\n{table}<!-- summary:end -->"
    for path in FILES:
        text = path.read_text()
        if not BLOCK.search(text):
            print(
                f"{path}: no <!-- summary:start --> ... <!-- summary:end --> block", file=sys.stderr
            )
            return 2
        text = BLOCK.sub(lambda _m: block, text)
        if LATENCY_BLOCK.search(text):  # optional: the README's deploy-speed section has one
            n = len(read_latency(LATENCY))
            lat = f"<!-- latency:start rows={n} -->\n{latency_generated(n)}<!-- latency:end -->"
            text = LATENCY_BLOCK.sub(lambda _m, lat=lat: lat, text)
        if GOALS_BLOCK.search(text):
            n = len(read_latency(LATENCY))
            goals = f"<!-- goals:start rows={n} -->\n{goals_generated(n)}<!-- goals:end -->"
            text = GOALS_BLOCK.sub(lambda _m, goals=goals: goals, text)
        if FUSED_BLOCK.search(text):
            fused = f"<!-- fused:start -->\n{fused_generated()}<!-- fused:end -->"
            text = FUSED_BLOCK.sub(lambda _m, fused=fused: fused, text)
        if AMDAHL_BLOCK.search(text):
            amdahl = f"<!-- amdahl:start -->\n{amdahl_generated()}<!-- amdahl:end -->"
            text = AMDAHL_BLOCK.sub(lambda _m, amdahl=amdahl: amdahl, text)
        if GPU_BLOCK.search(text):
            gpu = f"<!-- gpu:start -->\n{gpu_generated()}<!-- gpu:end -->"
            text = GPU_BLOCK.sub(lambda _m, gpu=gpu: gpu, text)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
