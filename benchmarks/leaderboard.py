"""The leaderboard: a declared-schema, append-only CSV of results, and the literature CSV reader.

Every number the project publishes lives in ``results/leaderboard.csv``, so the file must never be
silently corrupted. Rows are validated before anything is written (``benchmarks.rowcheck``; the
columns are declared in ``benchmarks.schema``). An append keeps the existing bytes verbatim (old
rows are never re-formatted) and replaces the file atomically with them plus the new row
(``gkp.fsio.atomic_write_bytes``), under an exclusive lock on the sibling ``<name>.lock``
(``gkp.fsio.exclusive_lock``), so that concurrent runs serialise. A symlinked leaderboard is
resolved first: the lock sits beside the real file, the real file is replaced, the link stays a
link, and writers given the link or the real path lock each other out. Under the lock, temporary
files a killed append left behind are removed.

Required columns: a new row must hold every required value (``REQUIRED_MEASURED`` for measured
rows, ``run_id`` included); rows already in a file are held to the same rule, except measured rows
without a ``run_id``, which predate that column and are held to the rule they were written under
(``REQUIRED_MEASURED_LEGACY``). Types, ranges (reductions are never negative) and derived columns
are checked on every row, old or new.

Legacy headers: columns are only added at the end of the schema, so a file whose header is one of
``LEGACY_HEADERS`` (a prefix of ``COLUMNS``) reads with the missing columns empty, and the next
append upgrades it under the lock: the current header, then every old record byte for byte with
empty trailing fields added. Any other header mismatch is an error.

Counting conventions: ``macs`` are conv + linear multiply-accumulates as fvcore counts them, with
gathers and permutations counted as 0; ``macs_bn`` adds 2 per BatchNorm output element (the
convention behind the GKP paper's 43.23%); ``params`` include BatchNorm affine parameters.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from benchmarks.csvtable import (
    Table,
    csv_line,
    parse_table,
    raise_problems,
    read_text,
    to_frame,
    upgraded_bytes,
)
from benchmarks.rowcheck import (  # noqa: F401  (re-exported: the leaderboard's public names)
    LeaderboardError,
    RowCheck,
    check_literature_row,
    check_new_row,
    check_stored_row,
    validate_row,
)
from benchmarks.schema import (  # noqa: F401  (re-exported: the leaderboard's public names)
    BY_NAME,
    COLUMNS,
    DERIVED,
    LEGACY_HEADERS,
    LITERATURE_REQUIRED,
    LITERATURE_SCHEMA,
    PCT_TOLERANCE,
    REQUIRED,
    REQUIRED_MEASURED,
    REQUIRED_MEASURED_LEGACY,
    REQUIRED_REPORTED,
    SCHEMA,
    SPEEDUP_RTOL,
    SPEEDUPS,
    Column,
    schema_markdown,
)
from gkp.fsio import atomic_write_bytes, exclusive_lock, remove_orphaned_temps


def utc_now() -> str:
    """The current time in the ``date`` column's format, e.g. 2025-01-31T12:00:00Z."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def legacy_run_id(record: str) -> str:
    """The ``run_id`` given to a row older than that column: ``legacy-`` + 12 hex digits of the
    sha256 of its CSV record as it stood in the file (UTF-8, without the line ending)."""
    return "legacy-" + hashlib.sha256(record.encode("utf-8")).hexdigest()[:12]


def empty_row() -> dict[str, None]:
    """A row with every column present and empty, for writers to fill in."""
    return dict.fromkeys(COLUMNS)


# ----------------------------------------------------------------------------- reading


def _parse_leaderboard(path: Path, data: bytes | None = None) -> Table:
    """The parsed leaderboard (``data`` when already read): stored-row rules, legacy headers."""
    return parse_table(read_text(path, data), SCHEMA, check_stored_row, LEGACY_HEADERS)


def read_leaderboard(path: str | os.PathLike) -> pd.DataFrame:
    """The leaderboard as a typed frame; a missing or empty file gives an empty frame.

    A file with a legacy header reads too, the columns it lacks empty.
    """
    path = Path(path)
    if not path.exists():
        return to_frame([], SCHEMA)
    table = _parse_leaderboard(path)
    if table.problems:
        raise_problems(path, table.problems)
    return to_frame(table.rows, SCHEMA)


def validate_file(path: str | os.PathLike) -> list[str]:
    """Every problem of a leaderboard file, each naming the file (empty when it is fine)."""
    path = Path(path)
    if not path.exists():
        return [f"{path}: does not exist (it is created by the first `gkp-bench` append)"]
    try:
        table = _parse_leaderboard(path)
    except LeaderboardError as exc:
        return [str(exc)]
    return [f"{path}: {p}" for p in table.problems]


def read_literature(path: str | os.PathLike) -> pd.DataFrame:
    """The papers' reported numbers (results/literature.csv) as a typed frame."""
    path = Path(path)
    if not path.exists():
        raise LeaderboardError(f"{path}: literature file not found; restore results/literature.csv")
    table = parse_table(read_text(path), LITERATURE_SCHEMA, check_literature_row)
    if table.problems:
        raise_problems(path, table.problems)
    return to_frame(table.rows, LITERATURE_SCHEMA)


# ----------------------------------------------------------------------------- writing


def append_row(path: str | os.PathLike, row: Mapping[str, object]) -> None:
    """Validate ``row`` and append it atomically; the file is created (with header) if missing.

    A symlink is followed (the link stays a link); a legacy header is upgraded; temporary files
    of killed appends are removed. A malformed existing file raises LeaderboardError and is left
    untouched, as is the file whenever the row is rejected.
    """
    path = Path(path)
    try:
        clean = validate_row(row)
    except LeaderboardError as exc:
        raise LeaderboardError(f"{path}: nothing appended: {exc}") from None
    with exclusive_lock(path) as real:
        remove_orphaned_temps(real)
        existing = real.read_bytes() if real.exists() else b""
        table = _parse_leaderboard(path, existing)
        if table.problems:
            raise_problems(path, table.problems, outcome=", nothing appended")
        new_line = csv_line([clean[c] for c in COLUMNS])
        atomic_write_bytes(real, upgraded_bytes(existing, table, COLUMNS) + new_line)
