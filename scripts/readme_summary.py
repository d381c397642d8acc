"""Rewrite the generated result tables in README.md and results/README.md from the leaderboard.

Each table sits between ``<!-- summary:start -->`` and ``<!-- summary:end -->`` and is exactly the
output of ``gkp-bench leaderboard summary --markdown`` (tests/test_readme.py checks it):

    .venv/bin/python scripts/readme_summary.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from benchmarks.leaderboard import read_leaderboard
from benchmarks.summary import summarize, summary_markdown

ROOT = Path(__file__).resolve().parent.parent
FILES = (ROOT / "README.md", ROOT / "results" / "README.md")
BLOCK = re.compile(r"(<!-- summary:start -->\n).*?(<!-- summary:end -->)", re.S)


def generated() -> str:
    return summary_markdown(summarize(read_leaderboard(ROOT / "results" / "leaderboard.csv")))


def main() -> int:
    table = generated()
    for path in FILES:
        text = path.read_text()
        if not BLOCK.search(text):
            print(
                f"{path}: no <!-- summary:start --> ... <!-- summary:end --> block", file=sys.stderr
            )
            return 2
        path.write_text(BLOCK.sub(lambda m: m.group(1) + table + m.group(2), text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
