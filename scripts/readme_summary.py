"""Rewrite the generated result tables in README.md and results/README.md from the leaderboard.

Each table sits between ``<!-- summary:start rows=N -->`` and ``<!-- summary:end -->`` and is
exactly the output of ``gkp-bench leaderboard summary --markdown`` over the leaderboard's first
``N`` rows (tests/test_readme.py checks it). The leaderboard is append-only, so rows a user adds
later (the README's main job appends some) leave the committed tables checkable:

    .venv/bin/python scripts/readme_summary.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from benchmarks.leaderboard import read_leaderboard
from benchmarks.summary import summarize, summary_markdown

ROOT = Path(__file__).resolve().parent.parent
LEADERBOARD = ROOT / "results" / "leaderboard.csv"
FILES = (ROOT / "README.md", ROOT / "results" / "README.md")
BLOCK = re.compile(r"<!-- summary:start(?: rows=(\d+))? -->\n(.*?)<!-- summary:end -->", re.S)


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
        path.write_text(BLOCK.sub(lambda _m: block, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
