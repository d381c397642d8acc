"""The leaderboard file: symlinks, killed appends, legacy headers, and the shipped results."""

from __future__ import annotations

import csv
import fcntl
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
from test_leaderboard import make_row

from benchmarks.leaderboard import (
    COLUMNS,
    LEGACY_HEADERS,
    LeaderboardError,
    append_row,
    csv_line,
    legacy_run_id,
    read_leaderboard,
    validate_file,
    validate_row,
)
from gkp.fsio import exclusive_lock

ROOT = Path(__file__).resolve().parents[1]
OLD = LEGACY_HEADERS[-1]  # the header before run_id, prune_commit and prune_info


def _link_to(tmp_path: Path) -> tuple[Path, Path]:
    """A real leaderboard in data/ and a symlink to it in another folder, link/."""
    real = tmp_path / "data" / "leaderboard.csv"
    link = tmp_path / "link" / "leaderboard.csv"
    real.parent.mkdir()
    link.parent.mkdir()
    link.symlink_to(real)
    return real, link


def _append_many(path: str, worker: int, count: int) -> None:
    for i in range(count):
        append_row(path, make_row(seed=worker * 100 + i))


def test_appends_through_a_symlink_and_the_real_path_all_land(tmp_path: Path) -> None:
    real, link = _link_to(tmp_path)
    context = multiprocessing.get_context("fork")
    paths = [link, real, link, real]
    workers = [
        context.Process(target=_append_many, args=(str(p), w, 25)) for w, p in enumerate(paths)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert not real.is_symlink()
    seeds = sorted(read_leaderboard(link)["seed"])
    assert seeds == sorted(w * 100 + i for w in range(4) for i in range(25))
    assert validate_file(real) == []
    assert real.with_name("leaderboard.csv.lock").exists()
    assert sorted(p.name for p in link.parent.iterdir()) == ["leaderboard.csv"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_first_append_through_a_dangling_link_creates_the_target(tmp_path: Path) -> None:
    real, link = _link_to(tmp_path)
    append_row(link, make_row())
    append_row(link, make_row(seed=1))
    assert link.is_symlink() and real.is_file()
    assert list(read_leaderboard(real)["seed"]) == [0, 1]


def test_lock_through_a_link_excludes_a_writer_of_the_real_path(tmp_path: Path) -> None:
    real, link = _link_to(tmp_path)
    with exclusive_lock(link) as locked, open(str(real) + ".lock", "a") as other:
        assert locked == real.resolve()
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(str(real) + ".lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the context


def _append_killed_before_rename(path: str) -> None:
    os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # dies mid-append
    append_row(path, make_row(seed=99))


def test_temp_file_of_a_killed_append_is_removed_by_the_next(tmp_path: Path) -> None:
    real, link = _link_to(tmp_path)
    append_row(real, make_row())
    before = real.read_bytes()
    process = multiprocessing.get_context("fork").Process(
        target=_append_killed_before_rename, args=(str(link),)
    )
    process.start()
    process.join(timeout=60)
    assert process.exitcode == -signal.SIGKILL
    orphans = list(real.parent.glob(".leaderboard.csv.*.tmp"))
    assert len(orphans) == 1 and real.read_bytes() == before
    keep = [real.parent / ".other.csv.abc.tmp", real.parent / "leaderboard.csv.bak"]
    for path in keep:
        path.write_text("not ours")
    append_row(link, make_row(seed=1))
    assert not orphans[0].exists()
    assert all(path.read_text() == "not ours" for path in keep)
    assert list(read_leaderboard(real)["seed"]) == [0, 1]


def test_failed_write_leaves_the_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "leaderboard.csv"
    append_row(path, make_row())
    before = path.read_bytes()

    def refuse(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        append_row(path, make_row(seed=1))
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- legacy headers


def _legacy_file(path: Path, *rows: dict, blank: tuple[str, ...] = ()) -> list[bytes]:
    """A file with the header before the newest columns, its rows' ``blank`` columns emptied;
    returns its data records' bytes."""
    typed = [validate_row(r) | dict.fromkeys(blank) for r in rows]
    records = [csv_line([t[c] for c in OLD]) for t in typed]
    path.write_bytes(csv_line(list(OLD)) + b"".join(records))
    return records


def test_legacy_headers_are_prefixes_of_the_columns() -> None:
    assert LEGACY_HEADERS and OLD[-1] == "reference"
    for header in LEGACY_HEADERS:
        assert 0 < len(header) < len(COLUMNS) and COLUMNS[: len(header)] == header


def test_legacy_file_reads_with_new_columns_empty(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    _legacy_file(path, make_row(seed=3))
    frame = read_leaderboard(path)
    assert list(frame.columns) == list(COLUMNS)
    assert frame.loc[0, "seed"] == 3
    assert frame.loc[0, ["run_id", "prune_commit", "prune_info"]].tolist() == ["", "", ""]
    assert validate_file(path) == []


def test_append_upgrades_a_legacy_file_keeping_old_bytes(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    multiline = make_row(seed=1, command="gkp-bench prune \\\n  --seed 1", options='{"a": "x,y"}')
    records = _legacy_file(path, make_row(seed=0), multiline)
    assert b'"gkp-bench prune \\\n  --seed 1"' in records[1]
    append_row(path, make_row(seed=2))
    pad = b"," * (len(COLUMNS) - len(OLD))
    expected = csv_line(list(COLUMNS)) + b"".join(r[:-1] + pad + b"\n" for r in records)
    new = path.read_bytes()
    assert new.startswith(expected)
    assert new[len(expected) :] == csv_line([validate_row(make_row(seed=2))[c] for c in COLUMNS])
    frame = read_leaderboard(path)
    assert list(frame["seed"]) == [0, 1, 2]
    assert frame.loc[1, "command"] == "gkp-bench prune \\\n  --seed 1"
    assert list(frame["run_id"]) == ["", "", "20250131T120000Z-0123abcd"]
    assert validate_file(path) == []


def test_rejected_row_leaves_a_legacy_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    _legacy_file(path, make_row())
    before = path.read_bytes()
    with pytest.raises(LeaderboardError, match="nothing appended"):
        append_row(path, make_row(top1_dense=None))
    assert path.read_bytes() == before


def test_legacy_row_is_held_to_the_rule_it_was_written_under(tmp_path: Path) -> None:
    """A row without run_id predates the stricter rule; a row with one is checked in full."""
    path = tmp_path / "leaderboard.csv"
    newly_required = ("top1_dense", "top1_pruned_before_ft", "git_commit")
    _legacy_file(path, make_row(), blank=newly_required)
    assert read_leaderboard(path)["top1_dense"].isna().all()
    assert validate_file(path) == []
    append_row(path, make_row(seed=1))  # upgrades the header; the old row still passes
    assert validate_file(path) == []
    lines = path.read_text().splitlines()
    assert lines[1].endswith('2022",,,')
    path.write_text("\n".join([lines[0], lines[1][:-3] + ",x-1,,", lines[2]]) + "\n")
    problems = validate_file(path)
    assert len(problems) == 1
    assert f"row 1 (line 2): required columns are empty: {list(newly_required)}" in problems[0]


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (COLUMNS[:10], "missing columns ['target'"),
        ((*OLD, "flops"), "unknown columns ['flops']"),
        ((*OLD, "prune_info"), "missing columns ['run_id', 'prune_commit']"),
    ],
)
def test_other_header_mismatches_stay_errors(tmp_path: Path, header: tuple, fragment: str) -> None:
    path = tmp_path / "leaderboard.csv"
    path.write_bytes(csv_line(list(header)))
    before = path.read_bytes()
    with pytest.raises(LeaderboardError, match="nothing appended") as info:
        append_row(path, make_row())
    assert fragment in str(info.value)
    assert path.read_bytes() == before
    with pytest.raises(LeaderboardError, match="header has"):
        read_leaderboard(path)


# ----------------------------------------------------------------------------- shipped file


def test_shipped_leaderboard_is_valid_and_its_run_ids_recompute() -> None:
    path = ROOT / "results" / "leaderboard.csv"
    assert validate_file(path) == []
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    frame = read_leaderboard(path)
    measured = frame[frame["source"] == "measured"]
    assert len(measured) >= 13 and (measured["run_id"] != "").all()
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    assert len(rows) == len(lines) - 1  # one physical line per row, so lines[i] is rows[i - 1]
    legacy = [
        (line, row)
        for line, row in zip(lines[1:], rows, strict=True)
        if row[-3].startswith("legacy-")
    ]
    assert len(legacy) == 13 and len({row[-3] for _, row in legacy}) == 13
    for line, row in legacy:
        suffix = f",{row[-3]},,"
        assert line.endswith(suffix) and row[-2:] == ["", ""]
        assert legacy_run_id(line[: -len(suffix)]) == row[-3]
