"""The result tables in the READMEs are generated from the leaderboard, never typed."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import readme_summary  # noqa: E402


@pytest.mark.parametrize("path", readme_summary.FILES, ids=lambda p: p.name)
def test_summary_tables_are_the_generated_ones(path):
    match = readme_summary.BLOCK.search(path.read_text())
    assert match, f"{path} has no generated summary block"
    inner = re.sub(r"^<!-- summary:start -->\n|<!-- summary:end -->$", "", match.group(0))
    assert inner == readme_summary.generated(), "run: python scripts/readme_summary.py"
