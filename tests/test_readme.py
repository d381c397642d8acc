"""The result tables in the READMEs are generated from the leaderboard, never typed."""

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
    assert match.group(1), f"{path}: no row count; run scripts/readme_summary.py"
    rows = int(match.group(1))
    assert match.group(2) == readme_summary.generated(rows), "run: python scripts/readme_summary.py"


def test_the_table_changes_with_the_rows_it_covers():
    # The row count is not decoration: a table over fewer rows is a different table.
    rows = int(readme_summary.BLOCK.search(readme_summary.FILES[0].read_text()).group(1))
    assert readme_summary.generated(rows) != readme_summary.generated(rows - 1)


@pytest.mark.parametrize("path", readme_summary.FILES, ids=lambda p: p.name)
def test_latency_tables_are_the_generated_ones(path):
    match = readme_summary.LATENCY_BLOCK.search(path.read_text())
    if match is None:
        pytest.skip(f"{path.relative_to(readme_summary.ROOT)} has no latency table")
    assert match.group(2) == readme_summary.latency_generated(int(match.group(1))), (
        "run: python scripts/readme_summary.py"
    )


def test_fused_kernel_table_is_the_generated_one():
    match = readme_summary.FUSED_BLOCK.search(readme_summary.FILES[0].read_text())
    assert match is not None, "README.md has no <!-- fused:start --> block"
    assert match.group(1) == readme_summary.fused_generated(), (
        "run: python scripts/readme_summary.py"
    )


def test_amdahl_table_is_the_generated_one():
    match = readme_summary.AMDAHL_BLOCK.search(readme_summary.FILES[0].read_text())
    assert match is not None, "README.md has no <!-- amdahl:start --> block"
    assert match.group(1) == readme_summary.amdahl_generated(), (
        "run: python scripts/readme_summary.py"
    )


def test_gpu_tables_are_the_generated_ones():
    match = readme_summary.GPU_BLOCK.search(readme_summary.FILES[0].read_text())
    assert match is not None, "README.md has no <!-- gpu:start --> block"
    assert match.group(1) == readme_summary.gpu_generated(), "run: python scripts/readme_summary.py"


def test_goal_table_is_the_generated_one():
    match = readme_summary.GOALS_BLOCK.search(readme_summary.FILES[0].read_text())
    assert match is not None, "README.md has no <!-- goals:start rows=N --> block"
    assert match.group(2) == readme_summary.goals_generated(int(match.group(1))), (
        "run: python scripts/readme_summary.py"
    )


def test_fused_table_labels_downsampling_layers():
    """``bench_fused.py --downsampling`` rows name their channel change and stride; rows of the
    committed CSV (no stride column) read as stride 1, so the README table is unchanged."""
    import bench_fused

    row = {"network": "resnet56", "channels": 16, "size": 32, "batch": 64, "threads": 1,
           "dense_gmacs": 1.0, "dense_cl_gmacs": 1.0, "torch_gmacs": 1.0, "torch_speedup": 1.0,
           "fused_gmacs": 1.0, "fused_speedup": 1.0, "fused_cl_gmacs": 1.0,
           "fused_cl_speedup": 1.0, "ideal": 1.78}  # fmt: skip
    old = bench_fused.table([row])
    assert "stride 1;" in old and "| resnet56 C=16 32x32 |" in old
    new = bench_fused.table([{**row, "out_channels": 32, "stride": 2}])
    assert "stride 2;" in new and "| resnet56 C=16->32 32x32 |" in new


def test_fused_csv_keeps_other_processors_rows_and_the_table_names_them(tmp_path):
    """``bench_fused.py --out`` replaces this processor's rows only; with rows of several
    processors, each table line names its processor."""
    import bench_fused

    row = {"network": "resnet56", "channels": 16, "size": 32, "batch": 64, "threads": 1,
           "dense_gmacs": 1.0, "dense_cl_gmacs": 1.0, "torch_gmacs": 1.0, "torch_speedup": 1.0,
           "fused_gmacs": 2.0, "fused_speedup": 2.0, "fused_cl_gmacs": 1.0,
           "fused_cl_speedup": 1.0, "ideal": 1.78}  # fmt: skip
    path = tmp_path / "fused.csv"
    bench_fused.write_rows(path, [{**row, "cpu_name": "Xeon"}])
    bench_fused.write_rows(path, [{**row, "cpu_name": "EPYC", "fused_gmacs": 3.0}])
    bench_fused.write_rows(path, [{**row, "cpu_name": "EPYC", "fused_gmacs": 4.0}])
    rows = bench_fused.read_rows(path)
    assert [(r["cpu_name"], r["fused_gmacs"]) for r in rows] == [("Xeon", 2.0), ("EPYC", 4.0)]
    text = bench_fused.table(rows)
    assert "measured on: Xeon, EPYC" in text
    assert "| resnet56 C=16 32x32 (Xeon) |" in text and "| resnet56 C=16 32x32 (EPYC) |" in text
    assert "(Xeon)" not in bench_fused.table(rows[:1])
