"""The leaderboard keeps its schema, never loses rows and never writes a half-checked file."""

from __future__ import annotations

import csv
import multiprocessing
from pathlib import Path

import pytest

from benchmarks.leaderboard import (
    COLUMNS,
    SCHEMA,
    LeaderboardError,
    append_row,
    empty_row,
    read_leaderboard,
    read_literature,
    schema_markdown,
    validate_file,
    validate_row,
)

ROOT = Path(__file__).resolve().parents[1]


def make_row(**overrides: object) -> dict:
    """A complete measured row whose derived columns agree (reductions computed by hand)."""
    row = empty_row() | {
        "date": "2025-01-31T12:00:00Z",
        "source": "measured",
        "method": "tmi-gkp",
        "granularity": "grouped_kernel",
        "faithfulness": "reconstructed",
        "options": {"rate": 0.4375, "groups": 8},
        "model": "resnet20",
        "dataset": "cifar10",
        "recipe": "cpu-tiny",
        "seed": 0,
        "finetune_epochs": 2,
        "macs_dense": 40_000_000,
        "macs": 22_000_000,
        "macs_reduction_pct": 45.0,  # 1 - 22/40
        "params_dense": 270_000,
        "params": 135_000,
        "params_reduction_pct": 50.0,
        "top1_dense": 91.5,
        "top1_pruned_before_ft": 10.0,
        "top1": 90.25,
        "device": "cpu",
        "threads": 2,
        "latency_b1_ms": 2.0,
        "latency_b1_dense_ms": 3.0,
        "speedup_b1": 1.5,
        "git_commit": "0123456789ab",
        "command": "gkp-bench prune --method tmi-gkp --model resnet20",
        "reference": "Zhong et al., ICLR 2022",
        "run_id": "20250131T120000Z-0123abcd",
        "prune_info": {"dropped_candidates": 2},
    }
    return row | overrides


def test_append_to_new_file_writes_header_and_row(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "leaderboard.csv"
    append_row(path, make_row())
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert len(lines) == 2
    frame = read_leaderboard(path)
    assert list(frame.columns) == list(COLUMNS)
    assert frame.loc[0, "macs"] == 22_000_000
    assert frame.loc[0, "top1"] == 90.25
    assert frame.loc[0, "options"] == '{"groups":8,"rate":0.4375}'
    assert frame.loc[0, "snapshot_window"] == ""
    assert frame.loc[0, "prune_info"] == '{"dropped_candidates":2}'
    assert frame.loc[0, "run_id"] == "20250131T120000Z-0123abcd"


def test_second_append_keeps_first_row_bytes(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    append_row(path, make_row(seed=1))
    first = path.read_bytes()
    append_row(path, make_row(seed=2))
    assert path.read_bytes().startswith(first)
    assert list(read_leaderboard(path)["seed"]) == [1, 2]


def test_missing_file_reads_as_empty_frame_with_schema(tmp_path: Path) -> None:
    frame = read_leaderboard(tmp_path / "absent.csv")
    assert frame.empty
    assert list(frame.columns) == list(COLUMNS)


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        (make_row(flops=3), "unknown columns ['flops']"),
        ({k: v for k, v in make_row().items() if k != "top5"}, "missing columns ['top5']"),
        (make_row(macs="lots"), "column 'macs': 'lots' is not an integer"),
        (make_row(top1="high"), "column 'top1': 'high' is not a number"),
        (make_row(granularity="block"), "'block' is not one of"),
        (make_row(top1=None), "required columns are empty: ['top1']"),
        (make_row(date="2025-01-31 12:00"), "not an ISO-8601 UTC time"),
        (make_row(options="[1, 2]"), "not a JSON object"),
        (make_row(snapshot_window="epochs 2 to 4"), "does not read like"),
        (make_row(macs_reduction_pct=43.23), "give 45.000"),
        (make_row(speedup_b1=2.0), "latency_b1_dense_ms/latency_b1_ms = 1.5000"),
        (make_row(macs_nonzero=30_000_000), "macs_nonzero=30000000 exceeds macs"),
        (make_row(top1=101.0), "outside [0, 100]"),
        (make_row(prune_info="[]"), "column 'prune_info': '[]' is not a JSON object"),
        (make_row(prune_info={"f": object()}), "prune_info is not JSON-serialisable"),
    ],
)
def test_bad_row_is_rejected_and_file_unchanged(tmp_path: Path, row: dict, fragment: str) -> None:
    path = tmp_path / "leaderboard.csv"
    append_row(path, make_row())
    before = path.read_bytes()
    with pytest.raises(LeaderboardError, match="nothing appended") as info:
        append_row(path, row)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before


def test_reported_row_needs_reference_but_no_measurements() -> None:
    reported = empty_row() | {
        k: make_row()[k]
        for k in ("date", "method", "granularity", "faithfulness", "model", "dataset", "top1")
    }
    reported |= {"source": "reported", "reference": "Zhong et al., ICLR 2022"}
    assert validate_row(reported)["macs"] is None
    with pytest.raises(LeaderboardError, match=r"required columns are empty: \['reference'\]"):
        validate_row(reported | {"reference": ""})


MEASURED_REQUIRED = (
    "recipe",
    "seed",
    "finetune_epochs",
    "macs_dense",
    "macs",
    "macs_reduction_pct",
    "params_dense",
    "params",
    "params_reduction_pct",
    "top1_dense",
    "top1_pruned_before_ft",
    "top1",
    "git_commit",
    "command",
    "run_id",
)


@pytest.mark.parametrize("column", MEASURED_REQUIRED)
def test_measured_row_needs_every_required_value(tmp_path: Path, column: str) -> None:
    path = tmp_path / "leaderboard.csv"
    append_row(path, make_row())
    before = path.read_bytes()
    for empty in (None, "", "  "):
        with pytest.raises(LeaderboardError, match="nothing appended") as info:
            append_row(path, make_row(**{column: empty}))
        assert f"required columns are empty: ['{column}']" in str(info.value)
        assert path.read_bytes() == before


def test_empty_top1_dense_is_refused_naming_the_column(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    append_row(path, make_row())
    before = path.read_bytes()
    with pytest.raises(LeaderboardError, match=r"required columns are empty: \['top1_dense'\]"):
        append_row(path, make_row(top1_dense=""))
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("overrides", "column"),
    [
        # 67_928_000 / 40_000_000 = 1.6982: a pruned model 69.82% larger than the dense one
        ({"macs": 67_928_000, "macs_reduction_pct": -69.82}, "macs_reduction_pct"),
        (
            {"macs_bn_dense": 100, "macs_bn": 110, "macs_bn_reduction_pct": -10.0},
            "macs_bn_reduction_pct",
        ),
        ({"params": 297_000, "params_reduction_pct": -10.0}, "params_reduction_pct"),
    ],
)
def test_negative_reduction_is_refused(tmp_path: Path, overrides: dict, column: str) -> None:
    path = tmp_path / "leaderboard.csv"
    append_row(path, make_row())
    before = path.read_bytes()
    with pytest.raises(LeaderboardError, match="nothing appended") as info:
        append_row(path, make_row(**overrides))
    assert f"column '{column}': -" in str(info.value)
    assert "is outside [0, 100]" in str(info.value)
    assert path.read_bytes() == before


def test_rejected_first_row_creates_no_file(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    with pytest.raises(LeaderboardError, match="top1_dense"):
        append_row(path, make_row(top1_dense=None))
    assert not path.exists()


def _corrupt_header(path: Path) -> None:
    text = path.read_text()
    path.write_text(text.replace("macs_dense", "flops_dense", 1))


def _corrupt_row(path: Path) -> None:
    path.write_text(path.read_text() + "2025-02-01T00:00:00Z,measured,truncated\n")


def _corrupt_number(path: Path) -> None:
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(",22000000,", ",22O00000,", 1)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("corrupt", "fragment"),
    [
        (_corrupt_header, "header has unknown columns ['flops_dense'], missing columns"),
        (_corrupt_row, "row 2 (line 3): 3 fields, expected"),
        (_corrupt_number, "row 1 (line 2): column 'macs': '22O00000' is not an integer"),
    ],
)
def test_malformed_existing_file_is_left_untouched(tmp_path: Path, corrupt, fragment: str) -> None:
    path = tmp_path / "leaderboard.csv"
    append_row(path, make_row())
    corrupt(path)
    before = path.read_bytes()
    with pytest.raises(LeaderboardError) as info:
        append_row(path, make_row(seed=7))
    assert fragment in str(info.value)
    assert path.read_bytes() == before
    with pytest.raises(LeaderboardError, match="problem"):
        read_leaderboard(path)
    problems = validate_file(path)
    assert len(problems) == 1 and fragment in problems[0]


def test_reordered_header_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    path.write_text(",".join(reversed(COLUMNS)) + "\n")
    with pytest.raises(LeaderboardError, match="different order"):
        read_leaderboard(path)


def test_validate_file_lists_every_problem_and_passes_good_files(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    append_row(path, make_row())
    append_row(path, make_row(seed=1))
    assert validate_file(path) == []
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(",grouped_kernel,", ",block,")
    lines[2] = lines[2].replace(",measured,", ",guessed,")
    path.write_text("\n".join(lines) + "\n")
    problems = validate_file(path)
    assert len(problems) == 2
    assert "row 1 (line 2): column 'granularity'" in problems[0]
    assert "row 2 (line 3): column 'source'" in problems[1]
    assert validate_file(tmp_path / "absent.csv")[0].endswith(
        "does not exist (it is created by the first `gkp-bench` append)"
    )


def _append_many(path: str, worker: int, count: int) -> None:
    for i in range(count):
        append_row(path, make_row(seed=worker * 100 + i))


def test_concurrent_appends_all_land(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), w, 5)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    seeds = list(read_leaderboard(path)["seed"])
    assert sorted(seeds) == sorted(w * 100 + i for w in range(4) for i in range(5))
    assert not list(tmp_path.glob("*.tmp"))


def test_readme_embeds_the_schema_table() -> None:
    readme = (ROOT / "results" / "README.md").read_text()
    assert schema_markdown() in readme, "paste benchmarks.leaderboard.schema_markdown() again"
    for column in SCHEMA:
        assert f"`{column.name}`" in readme


def test_schema_markdown_has_one_line_per_column() -> None:
    lines = schema_markdown().splitlines()
    assert len(lines) == 2 + len(SCHEMA)
    assert all(line.count("|") == 5 for line in lines)


def test_shipped_literature_reads() -> None:
    path = ROOT / "results" / "literature.csv"
    with path.open(newline="") as handle:
        expected = list(csv.DictReader(handle))
    frame = read_literature(path)
    assert len(frame) == len(expected) > 0
    assert list(frame["method"]) == [r["method"] for r in expected]
    assert frame["top1"].notna().all()
    resnet56 = frame[(frame["model"] == "resnet56") & (frame["method"] == "tmi-gkp")]
    assert resnet56["macs_reduction_pct"].tolist() == [43.23]


def test_malformed_literature_is_an_error(tmp_path: Path) -> None:
    source = (ROOT / "results" / "literature.csv").read_text().splitlines()
    broken = tmp_path / "literature.csv"
    broken.write_text("\n".join([source[0], source[1].replace(",92.01,", ",ninety,")]) + "\n")
    with pytest.raises(LeaderboardError, match="column 'top1': 'ninety' is not a number"):
        read_literature(broken)
    broken.write_text(source[0].replace(",where_read", "") + "\n")
    with pytest.raises(LeaderboardError, match=r"missing columns \['where_read'\]"):
        read_literature(broken)
    with pytest.raises(LeaderboardError, match="not found"):
        read_literature(tmp_path / "absent.csv")
