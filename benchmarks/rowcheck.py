"""Row checks of the leaderboard and literature CSVs: value coercion, required and derived columns.

Two required-columns rules, both declared in ``benchmarks.schema``:

- a row being appended (``validate_row``, ``check_new_row``) needs ``REQUIRED`` plus, when
  measured, ``REQUIRED_MEASURED`` (including ``run_id``), or, when reported, ``REQUIRED_REPORTED``;
- a row already in a file (``check_stored_row``) is held to the same rule, except a measured row
  with no ``run_id``: it was written before ``run_id`` existed, so it is held to the rule of its
  time, ``REQUIRED_MEASURED_LEGACY``. Types, ranges and derived columns are checked on every row.

So old files keep reading, and every row appended from now on carries every required value.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Callable, Mapping
from datetime import datetime

import pandas as pd

from benchmarks.schema import (
    DERIVED,
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
)


class LeaderboardError(ValueError):
    """A leaderboard or literature CSV, or a row meant for one, does not match its schema."""


RowCheck = Callable[[Mapping[str, object]], tuple[dict, list[str]]]

# ----------------------------------------------------------------------------- values


def is_empty(value: object) -> bool:
    """Whether ``value`` stands for "no value": None, NA, NaN or blank text."""
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
    if col.unit == "JSON" and isinstance(value, Mapping):
        try:
            return json.dumps(dict(value), sort_keys=True, separators=(",", ":"))
        except TypeError as exc:
            raise ValueError(f"{col.name} is not JSON-serialisable ({exc})") from None
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__} {value!r}")
    if col.choices and value not in col.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(col.choices)}")
    _check_format(col, value)
    return value


def _check_format(col: Column, value: str) -> None:
    """Check the columns whose text has a structure: date, JSON objects, snapshot_window."""
    if col.name == "date":
        try:
            stamp = datetime.fromisoformat(re.sub(r"Z$", "+00:00", value))  # "Z": py3.10 too
        except ValueError:
            stamp = None
        if stamp is None or stamp.utcoffset() is None or stamp.utcoffset().total_seconds():
            raise ValueError(f"{value!r} is not an ISO-8601 UTC time such as 2025-01-31T12:00:00Z")
    elif col.unit == "JSON":
        try:
            is_object = isinstance(json.loads(value), dict)
        except json.JSONDecodeError:
            is_object = False
        if not is_object:
            raise ValueError(f"{value!r} is not a JSON object")
    elif col.name == "snapshot_window" and not re.fullmatch(r"\d+-\d+ of \d+", value):
        raise ValueError(f"{value!r} does not read like '2-4 of 15'")


def coerce(col: Column, value: object) -> object:
    """``value`` as ``col``'s Python type (None when empty); ValueError says why it cannot be."""
    if is_empty(value):
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
                clean[col.name] = coerce(col, row[col.name])
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


def _leaderboard_row(row: Mapping[str, object], *, stored: bool) -> tuple[dict, list[str]]:
    clean, problems = _typed(row, SCHEMA)
    measured = REQUIRED_MEASURED
    if stored and clean.get("run_id") is None:
        measured = REQUIRED_MEASURED_LEGACY
    extra = {"measured": measured, "reported": REQUIRED_REPORTED}
    required = REQUIRED + extra.get(clean.get("source"), ())
    return clean, problems + _empty_required(clean, required) + _consistency(clean)


def check_new_row(row: Mapping[str, object]) -> tuple[dict, list[str]]:
    """A row to append, typed, and every problem with it (the strict required-columns rule)."""
    return _leaderboard_row(row, stored=False)


def check_stored_row(row: Mapping[str, object]) -> tuple[dict, list[str]]:
    """A row read from a leaderboard file, typed, and its problems (legacy rows: older rule)."""
    return _leaderboard_row(row, stored=True)


def check_literature_row(row: Mapping[str, object]) -> tuple[dict, list[str]]:
    """A literature.csv row, typed, and its problems."""
    clean, problems = _typed(row, LITERATURE_SCHEMA)
    return clean, problems + _empty_required(clean, LITERATURE_REQUIRED)


def validate_row(row: Mapping[str, object]) -> dict:
    """Check a row meant for the leaderboard and return it typed (None for empty values)."""
    clean, problems = check_new_row(row)
    if problems:
        raise LeaderboardError("leaderboard row rejected: " + "; ".join(problems))
    return clean
