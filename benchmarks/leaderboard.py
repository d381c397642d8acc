"""The leaderboard: a declared-schema, append-only CSV of results, and the literature CSV reader.

Every number the project publishes lives in ``results/leaderboard.csv``, so the file must never be
silently corrupted. Rows are validated against ``SCHEMA`` before anything is written. An append
keeps the existing bytes verbatim (old rows are never re-formatted), writes them plus the new row
to a temporary file in the same directory, fsyncs it and renames it over the original, all under
an exclusive ``flock`` on the sibling ``<name>.lock`` so that concurrent runs serialise.

Counting conventions: ``macs`` are conv + linear multiply-accumulates as fvcore counts them, with
gathers and permutations counted as 0; ``macs_bn`` adds 2 per BatchNorm output element (the
convention behind the GKP paper's 43.23%); ``params`` include BatchNorm affine parameters.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from benchmarks.schema import (  # noqa: F401  (re-exported: the leaderboard's public names)
    BY_NAME,
    COLUMNS,
    DERIVED,
    LITERATURE_REQUIRED,
    LITERATURE_SCHEMA,
    PCT_TOLERANCE,
    REQUIRED,
    REQUIRED_MEASURED,
    REQUIRED_REPORTED,
    SCHEMA,
    SPEEDUP_RTOL,
    SPEEDUPS,
    Column,
    schema_markdown,
)


class LeaderboardError(ValueError):
    """A leaderboard or literature CSV, or a row meant for one, does not match its schema."""


_FIX_HEADER = "move the file aside or fix its header to list exactly the schema's columns in order"
_FIX_ROW = "fix or remove that row (restore it from git if it was corrupted)"

RowCheck = Callable[[Mapping[str, object]], tuple[dict, list[str]]]


def utc_now() -> str:
    """The current time in the ``date`` column's format, e.g. 2025-01-31T12:00:00Z."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def empty_row() -> dict[str, None]:
    """A row with every column present and empty, for writers to fill in."""
    return dict.fromkeys(COLUMNS)


# ----------------------------------------------------------------------------- values


def _is_empty(value: object) -> bool:
    if value is None or value is pd.NA or (isinstance(value, str) and not value.strip()):
        return True
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, numbers.Integral)
        and (math.isnan(value))
    )


def _to_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(f"{value!r} is not an integer")


def _to_float(value: object) -> float:
    try:
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
            raise ValueError
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"{value!r} is not true or false")
    return text == "true"


def _to_str(col: Column, value: object) -> str:
    if col.name == "options" and isinstance(value, Mapping):
        try:
            return json.dumps(dict(value), sort_keys=True, separators=(",", ":"))
        except TypeError as exc:
            raise ValueError(f"options are not JSON-serialisable ({exc})") from None
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__} {value!r}")
    if col.choices and value not in col.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(col.choices)}")
    _check_format(col.name, value)
    return value


def _check_format(name: str, value: str) -> None:
    """Check the columns whose text has a structure: date, options, snapshot_window."""
    if name == "date":
        try:
            stamp = datetime.fromisoformat(re.sub(r"Z$", "+00:00", value))  # "Z": py3.10 too
        except ValueError:
            stamp = None
        if stamp is None or stamp.utcoffset() is None or stamp.utcoffset().total_seconds():
            raise ValueError(f"{value!r} is not an ISO-8601 UTC time such as 2025-01-31T12:00:00Z")
    elif name == "options":
        try:
            is_object = isinstance(json.loads(value), dict)
        except json.JSONDecodeError:
            is_object = False
        if not is_object:
            raise ValueError(f"{value!r} is not a JSON object")
    elif name == "snapshot_window" and not re.fullmatch(r"\d+-\d+ of \d+", value):
        raise ValueError(f"{value!r} does not read like '2-4 of 15'")


def _coerce(col: Column, value: object) -> object:
    """``value`` as ``col``'s Python type (None when empty); ValueError says why it cannot be."""
    if _is_empty(value):
        return None
    if col.dtype == "str":
        return _to_str(col, value)
    if col.dtype == "bool":
        return _to_bool(value)
    number = _to_int(value) if col.dtype == "int" else _to_float(value)
    lo, hi = col.bounds
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        raise ValueError(f"{number!r} is outside [{lo}, {hi}]")
    return number


# ----------------------------------------------------------------------------- rows


def _typed(row: Mapping[str, object], schema: tuple[Column, ...]) -> tuple[dict, list[str]]:
    """Coerce every known key of ``row``; report unknown, missing and ill-typed columns."""
    names = [c.name for c in schema]
    problems = []
    unknown = sorted(set(row) - set(names))
    missing = [n for n in names if n not in row]
    if unknown:
        problems.append(f"unknown columns {unknown} (rename or drop them; see the schema)")
    if missing:
        problems.append(
            f"missing columns {missing} (every row carries every column; "
            "use None or '' where a value does not apply)"
        )
    clean = {}
    for col in schema:
        if col.name in row:
            try:
                clean[col.name] = _coerce(col, row[col.name])
            except ValueError as exc:
                problems.append(f"column '{col.name}': {exc}")
    return clean, problems


def _empty_required(clean: Mapping[str, object], required: tuple[str, ...]) -> list[str]:
    empty = [n for n in required if n in clean and clean[n] is None]
    return [f"required columns are empty: {empty}"] if empty else []


def _consistency(clean: Mapping[str, object]) -> list[str]:
    """Recompute the derived columns (reductions, speed-ups) and flag those that disagree."""
    problems = []
    for pct, dense, pruned in DERIVED:
        values = [clean.get(pct), clean.get(dense), clean.get(pruned)]
        if None not in values and values[1] > 0:
            expected = 100 * (1 - values[2] / values[1])
            if abs(values[0] - expected) > PCT_TOLERANCE:
                problems.append(f"{pct}={values[0]} but {dense} and {pruned} give {expected:.3f}")
    for speedup, dense, pruned in SPEEDUPS:
        values = [clean.get(speedup), clean.get(dense), clean.get(pruned)]
        if None not in values and values[2] > 0:
            expected = values[1] / values[2]
            if abs(values[0] - expected) > SPEEDUP_RTOL * expected:
                problems.append(f"{speedup}={values[0]} but {dense}/{pruned} = {expected:.4f}")
    for nonzero, total in (("macs_nonzero", "macs"), ("params_nonzero", "params")):
        if None not in (clean.get(nonzero), clean.get(total)) and clean[nonzero] > clean[total]:
            problems.append(f"{nonzero}={clean[nonzero]} exceeds {total}={clean[total]}")
    return problems


def _leaderboard_row(row: Mapping[str, object]) -> tuple[dict, list[str]]:
    clean, problems = _typed(row, SCHEMA)
    extra = {"measured": REQUIRED_MEASURED, "reported": REQUIRED_REPORTED}
    required = REQUIRED + extra.get(clean.get("source"), ())
    return clean, problems + _empty_required(clean, required) + _consistency(clean)


def _literature_row(row: Mapping[str, object]) -> tuple[dict, list[str]]:
    clean, problems = _typed(row, LITERATURE_SCHEMA)
    return clean, problems + _empty_required(clean, LITERATURE_REQUIRED)


def validate_row(row: Mapping[str, object]) -> dict:
    """Check a leaderboard row against SCHEMA and return it typed (None for empty values)."""
    clean, problems = _leaderboard_row(row)
    if problems:
        raise LeaderboardError("leaderboard row rejected: " + "; ".join(problems))
    return clean


# ----------------------------------------------------------------------------- files


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


def _parse(text: str, schema: tuple[Column, ...], check: RowCheck) -> tuple[list[dict], list[str]]:
    """Typed rows of a CSV text and every problem found in it (an empty text has no rows)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        problems = _header_problems(header, schema)
        if problems:
            return [], problems
        rows = []
        for number, fields in enumerate(reader, start=1):
            where = f"row {number} (line {reader.line_num})"
            if len(fields) != len(schema):
                found = f"{len(fields)} fields, expected {len(schema)}"
                problems.append(f"{where}: {found}; {_FIX_ROW}")
                continue
            clean, found = check(dict(zip(header, fields, strict=True)))
            problems += [f"{where}: {p}; {_FIX_ROW}" for p in found]
            rows.append(clean)
    except csv.Error as exc:
        return [], [f"line {reader.line_num}: unreadable CSV ({exc}); {_FIX_ROW}"]
    return rows, problems


def _read_text(path: Path, data: bytes | None = None) -> str:
    """The file's text (``data`` when already read); LeaderboardError if it is not UTF-8."""
    try:
        return (path.read_bytes() if data is None else data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LeaderboardError(f"{path}: not UTF-8 text ({exc}); move the file aside") from None


def _raise_problems(path: Path, problems: list[str], outcome: str = "") -> None:
    shown = "; ".join(problems[:10]) + (
        f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
    )
    raise LeaderboardError(f"{path}: {len(problems)} problem(s){outcome}: {shown}")


def _frame(rows: list[dict], schema: tuple[Column, ...]) -> pd.DataFrame:
    """Typed rows as a frame: text "" when empty, nullable Int64/boolean, float NaN."""
    dtypes = {"str": object, "int": "Int64", "float": "float64", "bool": "boolean"}
    data = {}
    for col in schema:
        values = [row[col.name] for row in rows]
        if col.dtype == "str":
            values = ["" if v is None else v for v in values]
        data[col.name] = pd.Series(values, dtype=dtypes[col.dtype])
    return pd.DataFrame(data, columns=[c.name for c in schema])


def read_leaderboard(path: str | os.PathLike) -> pd.DataFrame:
    """The leaderboard as a typed frame; a missing or empty file gives an empty frame."""
    path = Path(path)
    if not path.exists():
        return _frame([], SCHEMA)
    rows, problems = _parse(_read_text(path), SCHEMA, _leaderboard_row)
    if problems:
        _raise_problems(path, problems)
    return _frame(rows, SCHEMA)


def validate_file(path: str | os.PathLike) -> list[str]:
    """Every problem of a leaderboard file, each naming the file (empty when it is fine)."""
    path = Path(path)
    if not path.exists():
        return [f"{path}: does not exist (it is created by the first `gkp-bench` append)"]
    try:
        _, problems = _parse(_read_text(path), SCHEMA, _leaderboard_row)
    except LeaderboardError as exc:
        return [str(exc)]
    return [f"{path}: {p}" for p in problems]


def read_literature(path: str | os.PathLike) -> pd.DataFrame:
    """The papers' reported numbers (results/literature.csv) as a typed frame."""
    path = Path(path)
    if not path.exists():
        raise LeaderboardError(f"{path}: literature file not found; restore results/literature.csv")
    rows, problems = _parse(_read_text(path), LITERATURE_SCHEMA, _literature_row)
    if problems:
        _raise_problems(path, problems)
    return _frame(rows, LITERATURE_SCHEMA)


def _csv_line(values: list[object]) -> bytes:
    def text(value: object) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, float) else str(value)

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([text(v) for v in values])
    return buffer.getvalue().encode("utf-8")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``<path>.lock`` (a sibling, so the data file can be replaced)."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that readers see the old or the new file, never a mix."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def append_row(path: str | os.PathLike, row: Mapping[str, object]) -> None:
    """Validate ``row`` and append it atomically; the file is created (with header) if missing.

    A malformed existing file raises LeaderboardError and is left untouched.
    """
    path = Path(path)
    try:
        clean = validate_row(row)
    except LeaderboardError as exc:
        raise LeaderboardError(f"{path}: nothing appended: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        existing = path.read_bytes() if path.exists() else b""
        _, problems = _parse(_read_text(path, existing), SCHEMA, _leaderboard_row)
        if problems:
            _raise_problems(path, problems, outcome=", nothing appended")
        if not existing:
            existing = _csv_line(list(COLUMNS))
        elif not existing.endswith(b"\n"):
            existing += b"\n"
        _atomic_write(path, existing + _csv_line([clean[c] for c in COLUMNS]))
