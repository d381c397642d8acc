"""Declared-schema CSV files: parse them into typed rows with every problem named, write lines.

Shared by the leaderboard and the literature CSV (``benchmarks.leaderboard``). Parsing keeps each
data record's raw text, so that a writer can keep old records byte for byte.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmarks.rowcheck import LeaderboardError, RowCheck
from benchmarks.schema import Column

_FIX_HEADER = "move the file aside or fix its header to list exactly the schema's columns in order"
_FIX_ROW = "fix or remove that row (restore it from git if it was corrupted)"


@dataclass
class Table:
    """A parsed CSV: its header, typed rows, problems, and each data record's raw text."""

    header: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)


def _records(text: str) -> Iterator[tuple[list[str], str, int]]:
    """(fields, raw text with line ending, last line number) of each CSV record of ``text``.

    csv.Error is raised with the line it stopped at.
    """
    lines = list(io.StringIO(text, newline=""))
    reader = csv.reader(iter(lines))
    start = 0
    try:
        for fields in reader:
            yield fields, "".join(lines[start : reader.line_num]), reader.line_num
            start = reader.line_num
    except csv.Error as exc:
        raise csv.Error(f"line {reader.line_num}: unreadable CSV ({exc})") from None


def _header_problems(header: list[str], schema: tuple[Column, ...]) -> list[str]:
    names = [c.name for c in schema]
    if header == names:
        return []
    unknown = [h for h in header if h not in names]
    missing = [n for n in names if n not in header]
    repeated = sorted({h for h in header if header.count(h) > 1})
    found = [
        f"{label} {cols}"
        for label, cols in (
            ("unknown columns", unknown),
            ("missing columns", missing),
            ("repeated", repeated),
        )
        if cols
    ] or ["the schema's columns in a different order"]
    return [f"header has {', '.join(found)}; {_FIX_HEADER}"]


def parse_table(
    text: str, schema: tuple[Column, ...], check: RowCheck, legacy: tuple[tuple[str, ...], ...] = ()
) -> Table:
    """The parsed CSV text and every problem found in it (an empty text has no rows).

    A header in ``legacy`` (a prefix of the schema's columns) is accepted; its rows are read with
    the missing trailing columns empty.
    """
    names = [c.name for c in schema]
    table = Table()
    records = _records(text)
    try:
        first = next(records, None)
        if first is None:
            return table
        table.header = first[0]
        if tuple(table.header) not in legacy:
            table.problems = _header_problems(table.header, schema)
            if table.problems:
                return table
        pad = [""] * (len(names) - len(table.header))
        for number, (fields, raw, line) in enumerate(records, start=1):
            where = f"row {number} (line {line})"
            if len(fields) != len(table.header):
                found = f"{len(fields)} fields, expected {len(table.header)}"
                table.problems.append(f"{where}: {found}; {_FIX_ROW}")
                continue
            clean, found = check(dict(zip(names, fields + pad, strict=True)))
            table.problems += [f"{where}: {p}; {_FIX_ROW}" for p in found]
            table.rows.append(clean)
            table.records.append(raw)
    except csv.Error as exc:
        return Table(problems=[f"{exc}; {_FIX_ROW}"])
    return table


def read_text(path: Path, data: bytes | None = None) -> str:
    """The file's text (``data`` when already read); LeaderboardError if it is not UTF-8."""
    try:
        return (path.read_bytes() if data is None else data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LeaderboardError(f"{path}: not UTF-8 text ({exc}); move the file aside") from None


def raise_problems(path: Path, problems: list[str], outcome: str = "") -> None:
    """Raise LeaderboardError naming ``path``, the number of problems and the first ten."""
    shown = "; ".join(problems[:10]) + (
        f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
    )
    raise LeaderboardError(f"{path}: {len(problems)} problem(s){outcome}: {shown}")


def to_frame(rows: list[dict], schema: tuple[Column, ...]) -> pd.DataFrame:
    """Typed rows as a frame: text "" when empty, nullable Int64/boolean, float NaN."""
    dtypes = {"str": object, "int": "Int64", "float": "float64", "bool": "boolean"}
    data = {}
    for col in schema:
        values = [row[col.name] for row in rows]
        if col.dtype == "str":
            values = ["" if v is None else v for v in values]
        data[col.name] = pd.Series(values, dtype=dtypes[col.dtype])
    return pd.DataFrame(data, columns=[c.name for c in schema])


def csv_line(values: list[object]) -> bytes:
    """One CSV record, newline-terminated: None empty, bools true/false, floats by repr."""

    def text(value: object) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, float) else str(value)

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([text(v) for v in values])
    return buffer.getvalue().encode("utf-8")


def upgraded_bytes(existing: bytes, table: Table, columns: tuple[str, ...]) -> bytes:
    """The existing file as it should stand before new rows: header first, newline-terminated.

    A legacy header (a prefix of ``columns``) is replaced by the current one and every old
    record padded with empty trailing fields; the records are otherwise kept byte for byte.
    """
    if not existing:
        return csv_line(list(columns))
    if table.header != list(columns):
        pad = len(columns) - len(table.header)
        records = "".join(pad_record(r, pad) for r in table.records)
        return csv_line(list(columns)) + records.encode("utf-8")
    return existing if existing.endswith(b"\n") else existing + b"\n"


def replace_rows(path: Path, rows: list[dict], key: tuple[str, ...]) -> None:
    """Write ``rows`` (plain dict rows, their first row's fields as the header) to ``path``,
    keeping the rows already there whose ``key`` values no new row has; a kept row's missing
    fields are left empty. For the scripts' result files that hold one set of rows per machine
    or configuration (``results/fused_kernel.csv``, ``results/amdahl.csv``)."""
    new = {tuple(str(r[k]) for k in key) for r in rows}
    kept = []
    if path.exists():
        with path.open(newline="") as handle:
            kept = [r for r in csv.DictReader(handle)
                    if tuple(r.get(k, "") for k in key) not in new]  # fmt: skip
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: r.get(k, "") for k in rows[0]} for r in kept] + rows)


def pad_record(record: str, fields: int) -> str:
    """``record`` with ``fields`` empty fields added before its line ending (added if none)."""
    body = record.rstrip("\r\n")
    return body + "," * fields + (record[len(body) :] or "\n")
